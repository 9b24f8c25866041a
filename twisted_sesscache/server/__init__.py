"""The server side: connection creator, external store wiring, shared ticket keys, flush schedule."""

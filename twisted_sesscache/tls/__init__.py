"""TLS details below the session cache: the watched connection, ClientHello parsing, encoded sessions."""

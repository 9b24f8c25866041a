"""The client side: which session a Twisted client offers, and where it learns new ones."""

"""Anchors: the processes that make a server's bus connections, so the bus sees the app
instance and never the service (SPEC section 10)."""

"""The proxy: the listener and its TLS, one session per client (routing, authentication,
limits, cancel keys), and the relay of bytes to a backend once logged in."""

"""TLS material: dev certificate generation and the gateway's server SSLContext."""

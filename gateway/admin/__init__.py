"""The admin HTTP API of a running gateway: health, readiness, metrics, and the operations
of gateway/ops under /v1."""

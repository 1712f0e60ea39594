"""`pgsni`, the one console script: serve, and the offline operator commands."""

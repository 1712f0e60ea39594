"""Compute: the life of each database (lifecycle.py) and the Postgres instances that run
them (instances.py, postgres.py), with their roles, binaries, templates and OS limits."""

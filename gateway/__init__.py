"""pgsni gateway: TLS + SNI front door, SCRAM auth, per-database Postgres and the relay."""

__version__ = "0.1.0"

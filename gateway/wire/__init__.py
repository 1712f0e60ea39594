"""The Postgres wire protocol without I/O: bytes in, messages out (protocol.py), the
client's opening bytes told apart (opening.py), and SCRAM conversations (scram.py)."""

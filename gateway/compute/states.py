"""The states of a database's life and the moves between them (the diagram is in
gateway/compute/lifecycle.py, whose Database makes the moves)."""

from __future__ import annotations

import enum


class State(enum.Enum):
    ABSENT = "absent"  # nowhere: neither here nor in storage
    STORED = "stored"  # only in storage
    LOCAL = "local"  # a local copy equal to its stored version, stopped
    STARTING = "starting"  # a postmaster is being started (slot, lock and lease held)
    RUNNING = "running"
    CHANGED = "changed"  # stopped, with changes not yet in storage
    CONFLICT = "conflict"  # copies set aside: changes storage moved past (see db info)
    FENCED = "fenced"  # this gateway's heartbeat lapsed: nothing runs until it claims again


S = State
# The diagram of gateway/compute/lifecycle.py as data: every move a Database makes is checked
# against it.
EDGES: dict[State, frozenset[State]] = {
    S.ABSENT: frozenset({S.STARTING, S.LOCAL, S.STORED}),  # create; upload or fork
    S.STORED: frozenset({S.LOCAL, S.ABSENT, S.STORED}),  # restore; delete; a newer version
    S.LOCAL: frozenset({S.STARTING, S.STORED, S.ABSENT, S.LOCAL, S.CHANGED}),
    S.STARTING: frozenset({S.RUNNING, S.LOCAL, S.CHANGED, S.ABSENT}),
    S.RUNNING: frozenset({S.LOCAL, S.CHANGED, S.FENCED, S.ABSENT}),
    S.CHANGED: frozenset({S.LOCAL, S.CONFLICT, S.STARTING, S.ABSENT, S.CHANGED}),
    S.CONFLICT: frozenset({S.STORED, S.LOCAL, S.STARTING, S.ABSENT}),
    S.FENCED: frozenset({S.CHANGED, S.LOCAL, S.STARTING, S.CONFLICT}),
}

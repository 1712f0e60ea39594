"""The life of one database, as states and the transitions between them. InstanceManager
(gateway/compute/instances.py) is the only code that moves a database from one state to
another (tests/test_lifecycle_owner.py fails on any other caller of the transitions); the CLI,
the admin API, uploads, forks and upgrades ask it, inside `stopped(id)` where they change the
copy or storage.

    ABSENT ──create──▶ RUNNING
    STORED ──claim lease, restore (fresh pointer), fsync──▶ LOCAL ──start──▶ RUNNING
    RUNNING ──stop: idle, evicted, requested, shutdown──▶ (pg_control: written since start?)
        ├─ no  ──▶ LOCAL (clean: equals its stored version) ──evict──▶ STORED
        └─ yes ──▶ CHANGED ──save──▶ LOCAL            (saved: lease released at once)
    CHANGED ──save fails (storage down)──▶ CHANGED    (retried by `maintain`)
    RUNNING ──heartbeat lapsed──▶ FENCED: every instance stopped at once, no save;
        the copy stays CHANGED and is saved only under a fresh lease
    CHANGED ──storage moved past it (another gateway took over)──▶ CONFLICT:
        set aside in <data_root>/.conflict-<id>-<time>-<hex>; the stored version is used

Saving and restoring happen with the database's lock held; a start holds its lease, its file
lock and a slot under max_instances (reserved before it starts)."""

from __future__ import annotations

import enum

from .instances import InstanceManager


class State(enum.Enum):
    ABSENT = "absent"  # nowhere: neither here nor in storage
    STORED = "stored"  # only in storage
    LOCAL = "local"  # a local copy equal to its stored version, stopped
    STARTING = "starting"  # a postmaster is being started (slot, lock and lease held)
    RUNNING = "running"
    CHANGED = "changed"  # stopped, with changes not yet in storage
    CONFLICT = "conflict"  # copies set aside: changes storage moved past (see db info)
    FENCED = "fenced"  # this gateway's heartbeat lapsed: nothing runs until it claims again


async def state_of(manager: InstanceManager, db_id: str, *, stored: bool | None = None,
                   set_aside: list | None = None) -> State:
    """Where `db_id` is in its life, as seen by this gateway. `stored` (whether storage has a
    current version) and `set_aside` (its set-aside copies) are read here unless the caller
    has just read them."""
    inst = manager.instances.get(db_id)
    if inst is not None and inst.alive:
        return State.RUNNING
    if db_id in manager.starting:
        return State.STARTING
    if manager.leases.fencing_needed() and db_id in manager.leases.lapsed:
        return State.FENCED
    if set_aside is None:
        set_aside = manager.databases.set_aside_copies(db_id)
    if set_aside:
        return State.CONFLICT  # until the operator has dealt with them
    if manager.catalog.exists(db_id):
        return State.CHANGED if manager.databases.state(db_id).dirty else State.LOCAL
    if stored is None:
        stored = await manager.databases.current(db_id, fresh=True) is not None
    return State.STORED if stored else State.ABSENT

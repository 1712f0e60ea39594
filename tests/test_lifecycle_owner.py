"""A database's lifecycle object (gateway/compute/lifecycle.py) is the only writer of its
state: no other module of the product calls the transitions of the local cache, the catalog,
the stored versions or the leases directly."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWNERS = {"gateway/compute/lifecycle.py", "gateway/compute/held.py"}  # Database, and Held for operations

# storage/cache.py's transitions of a local copy (`recover` at start-up stays the manager's:
# nothing runs yet), the catalog's delete, the stored versions' writes, the leases' claims
TRANSITIONS = {"save", "install", "set_aside", "mark_running", "mark_stopped", "put_in_place",
               "save_state", "evict", "ensure_local", "catch_up", "base_made_current"}
STORE_WRITES = {"snapshot", "set_current", "delete_database", "delete_version"}
LEASE_MOVES = {"claim", "release", "release_later"}
CALLS = {"roll_back", "fork_version"}


def violations(source: str) -> list[str]:
    """Calls like `<...>databases.save(...)`, `<...>catalog.delete(...)` (also passed to
    to_thread), `<...>store.snapshot(...)`, `<...>leases.claim(...)` and `roll_back(databases, ...)`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else (
                node.value.id if isinstance(node.value, ast.Name) else "")
            if (owner == "databases" and node.attr in TRANSITIONS) or (
                    owner == "catalog" and node.attr == "delete") or (
                    owner == "store" and node.attr in STORE_WRITES) or (
                    owner == "leases" and node.attr in LEASE_MOVES):
                found.append(f"line {node.lineno}: {owner}.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in CALLS):
            found.append(f"line {node.lineno}: {node.func.id}")
    return found


def test_only_the_lifecycle_moves_a_database_between_states():
    offenders = {}
    for package in ("gateway", "certs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in OWNERS and (found := violations(path.read_text())):
                offenders[rel] = found
    assert not offenders, ("state transitions outside the lifecycle (ask its Database instead, "
                           f"inside `held()`): {offenders}")


def test_the_check_sees_what_it_must():
    assert violations("async def f(self):\n    await self.databases.save(x)\n")
    assert violations("await asyncio.to_thread(self.catalog.delete, db_id)")
    assert violations("saved, target = await roll_back(databases, db_id, v)")
    assert violations("await self.store.delete_database(db_id)")
    assert violations("await manager.leases.claim(db_id)")
    assert violations("forked = await fork_version(self.store, manifest, new)")
    assert not violations("await held.save_now(note='x')")
    assert not violations("await self.store.manifest(db_id, version)")
    assert not violations("self.databases.state(db_id).dirty")

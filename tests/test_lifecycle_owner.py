"""The instance manager (gateway/compute/instances.py) is the only writer of a database's
state (gateway/compute/lifecycle.py): no other module of the product calls the transitions
of the local cache and the catalog directly."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWNER = "gateway/compute/instances.py"

# storage/cache.py's transitions of a local copy, and the catalog's delete
TRANSITIONS = {"save", "install", "set_aside", "mark_running", "mark_stopped", "put_in_place",
               "save_state", "recover", "evict", "ensure_local", "catch_up"}


def violations(source: str) -> list[str]:
    """Calls like `<...>databases.save(...)`, `<...>catalog.delete(...)` (also passed to
    to_thread) and `roll_back(databases, ...)`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else (
                node.value.id if isinstance(node.value, ast.Name) else "")
            if (owner == "databases" and node.attr in TRANSITIONS) or (
                    owner == "catalog" and node.attr == "delete"):
                found.append(f"line {node.lineno}: {owner}.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "roll_back"):
            found.append(f"line {node.lineno}: roll_back")
    return found


def test_only_the_instance_manager_moves_a_database_between_states():
    offenders = {}
    for package in ("gateway", "certs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != OWNER and (found := violations(path.read_text())):
                offenders[rel] = found
    assert not offenders, ("state transitions outside the instance manager (ask it instead, "
                           f"inside `stopped(id)`): {offenders}")


def test_the_check_sees_what_it_must():
    assert violations("async def f(self):\n    await self.databases.save(x)\n")
    assert violations("await asyncio.to_thread(self.catalog.delete, db_id)")
    assert violations("saved, target = await roll_back(databases, db_id, v)")
    assert not violations("await self.manager.save_now(db_id, note='x')")
    assert not violations("self.databases.state(db_id).dirty")

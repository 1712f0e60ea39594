"""The package layout is the architecture: dependencies run one way, and no modules import
each other in a loop. Every import counts, also one inside a function or under
TYPE_CHECKING (a cycle hidden by a local import is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "storage", "certs")

BASE = "gateway.base"  # the modules directly in gateway/: settings, errors, logs, metrics
# what each layer may import besides itself (see "Where things live" in the README)
ALLOWED = {
    "gateway.wire": set(),
    "storage": set(),
    "certs": {"storage"},
    BASE: {"gateway.wire", "storage"},
    "gateway.compute": {BASE, "gateway.wire", "storage"},
    "gateway.proxy": {BASE, "gateway.wire", "gateway.compute", "storage", "certs"},
    "gateway.ops": {BASE, "gateway.wire", "gateway.compute", "storage"},
    "gateway.admin": {BASE, "gateway.ops", "gateway.compute", "storage", "certs"},
    "gateway.app": {BASE, "gateway.wire", "gateway.compute", "gateway.proxy", "gateway.ops",
                    "gateway.admin", "storage", "certs"},
    "gateway.cli": {BASE, "gateway.wire", "gateway.compute", "gateway.ops", "gateway.app",
                    "storage", "certs"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, wherever in the file the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "gateway":
        return parts[0]
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in ("app",) and
                           not (ROOT / "gateway" / parts[1]).is_dir()):
        return BASE
    return ".".join(parts[:2])


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_layers_depend_one_way():
    wrong = []
    for module, targets in sorted(graph().items()):
        mine = layer(module)
        assert mine in ALLOWED, f"{module} is in no known layer ({mine}): add it to ALLOWED"
        for target in sorted(targets):
            theirs = layer(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_the_checker_sees_local_and_type_checking_imports(tmp_path):
    # the check itself must be able to fail: a cycle made only of a function-level import
    # and a TYPE_CHECKING import is found
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    g = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(g) == [["a", "b"]]

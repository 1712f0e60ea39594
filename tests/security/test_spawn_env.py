"""Every process the gateway starts gets an environment built from nothing
(storage/osuser.clean_env), never a copy of the gateway's own, which holds the storage keys
and the admin token. This walks the source of the three packages: a spawn call without an
explicit `env=`, or one whose environment mentions `os.environ`, fails the test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from storage.osuser import clean_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "storage", "certs")
SPAWNERS = {("subprocess", n) for n in ("run", "Popen", "call", "check_call", "check_output")} | \
    {("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell")}
FORBIDDEN = {("os", n) for n in ("system", "popen", "execv", "execve", "execvp", "execvpe", "execl",
                                 "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl",
                                 "posix_spawn", "posix_spawnp", "fork", "forkpty")}


def _name(func: ast.expr) -> tuple[str, str] | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    return None


def _mentions_environ(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "environ" for n in ast.walk(node))


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def copies_environ(node: ast.AST) -> bool:
    """Whether `node` copies the whole environment: os.environ.items()/.copy()/.keys(),
    dict(os.environ), {**os.environ} or os.environ | {...}. Reading one variable is fine."""
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and _is_environ(f.value) and f.attr in ("items", "copy", "keys", "values"):
            return True
        if isinstance(f, ast.Name) and f.id == "dict" and node.args and _is_environ(node.args[0]):
            return True
    if isinstance(node, ast.Dict):
        return any(k is None and _is_environ(v) for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_environ(node.left) or _is_environ(node.right)
    return False


def spawn_problems(source: str, filename: str) -> list[str]:
    problems = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if copies_environ(node):
            problems.append(f"{filename}:{node.lineno}: copies the gateway's whole environment")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        where = f"{filename}:{node.lineno}"
        if name in FORBIDDEN:
            problems.append(f"{where}: {name[0]}.{name[1]} starts a process without an explicit environment")
        elif name in SPAWNERS or (isinstance(node.func, ast.Name) and node.func.id == "Popen"):
            # asyncio.to_thread(subprocess.run, ...) passes the function itself: checked below
            env = [k for k in node.keywords if k.arg == "env"]
            if not env:
                problems.append(f"{where}: process started without env= (it would inherit the gateway's)")
            elif _mentions_environ(env[0].value):
                problems.append(f"{where}: env= is built from os.environ")
        elif (isinstance(node.func, ast.Attribute) and node.func.attr == "to_thread" and node.args
              and _name(node.args[0]) in SPAWNERS):
            env = [k for k in node.keywords if k.arg == "env"]
            if not env or _mentions_environ(env[0].value):
                problems.append(f"{where}: process started through to_thread without a clean env=")
    return problems


# the one process start that is not a program the gateway runs but the gateway itself: the
# supervisor of `serve --workers N` forks its workers, each a gateway (they need its settings
# and storage keys), which start Postgres and tools through the same clean-env paths as any
ALLOWED = {("gateway/workers.py", "os.fork")}


def test_every_spawn_site_passes_a_clean_environment():
    problems = []
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30  # the walk found the code
    for path in files:
        problems += spawn_problems(path.read_text(), str(path.relative_to(ROOT)))
    allowed = [p for p in problems if any(p.startswith(f"{f}:") and f" {call} " in p for f, call in ALLOWED)]
    assert len(allowed) == len(ALLOWED), f"an allowed site is gone or repeated: {allowed}"
    assert not set(problems) - set(allowed), "\n".join(sorted(set(problems) - set(allowed)))


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['x'])",
    "import subprocess\nsubprocess.Popen(['x'], env=os.environ)",
    "import subprocess\nsubprocess.run(['x'], env={**os.environ, 'A': '1'})",
    "import os\nos.system('x')",
    "import asyncio, subprocess\nasyncio.to_thread(subprocess.run, ['cp'], check=True)",
    "import asyncio\nasyncio.create_subprocess_exec('x')",
    "def tool_env():\n    return {k: v for k, v in os.environ.items() if not k.startswith('PG')}",
    "def tool_env():\n    return dict(os.environ, PGAPPNAME='x')",
    "def tool_env():\n    return {**os.environ}",
])
def test_the_check_catches_inherited_environments(code):
    assert spawn_problems(code, "example.py")


def test_the_check_accepts_a_clean_environment():
    code = "import subprocess\nsubprocess.run(['x'], env=clean_env(PGAPPNAME='pgsni'))"
    assert spawn_problems(code, "example.py") == []


def test_clean_env_holds_nothing_of_the_gateways(monkeypatch):
    monkeypatch.setenv("PGSNI_S3_SECRET_KEY", "leak-me")
    monkeypatch.setenv("PGSNI_ADMIN_TOKEN", "leak-me-too")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-leak")
    monkeypatch.setenv("PGHOST", "/elsewhere")
    env = clean_env(PGAPPNAME="pgsni")
    assert "leak" not in repr(env)
    assert not any(k.startswith(("PGSNI_", "AWS_")) or k == "PGHOST" for k in env)
    assert env["PGAPPNAME"] == "pgsni" and "/usr/bin" in env["PATH"]

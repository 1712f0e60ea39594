"""Fixtures for the client-compatibility suite: one gateway per test session (per xdist
worker), one database per client module, and a runner for scenario scripts in other languages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import Settings

from ..conftest import PG_OPTIONS, no_session_crashes, pg_bindir, reachable_tmpdir, seed_template
from ..support.harness import DOMAIN, TEST_PASSWORD, GatewayThread
from .contract import script_env

HERE = Path(__file__).parent
NODE_DIR = HERE / "node"
INSTALL_HINT = "run tests/clients/install.sh (./dev test does)"


@dataclass(frozen=True)
class Target:
    """Where a client connects: the gateway's port and CA, and its own database."""
    port: int
    ca: Path
    db: str
    password: str = TEST_PASSWORD
    user: str = "postgres"

    @property
    def sni_name(self) -> str:
        return f"{self.db}.{DOMAIN}"

    def ssl_context(self) -> ssl.SSLContext:
        # the test certificate also names 127.0.0.1, so hostname checking stays on either way
        return ssl.create_default_context(cafile=str(self.ca))

    def env(self) -> dict[str, str]:
        """What scenario scripts read: PGSNI_* variables on top of this process' environment,
        less libpq's own PG* variables (PGOPTIONS, PGSSLMODE... would change what is tested)."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return {**inherited, "PGSNI_PORT": str(self.port), "PGSNI_CA": str(self.ca),
                "PGSNI_DB": self.db, "PGSNI_HOST": self.sni_name, "PGSNI_ADDR": "127.0.0.1",
                "PGSNI_USER": self.user, "PGSNI_PASSWORD": self.password}


@pytest.fixture(scope="session")
def client_gateway(tls, template_pgdata):
    """A gateway shared by every client module (a database each): starting one per test
    would cost a template copy and a Postgres start every time."""
    root = reachable_tmpdir("pgsni-clients-")
    seed_template(root, template_pgdata)  # as tests/conftest.py's data_root does, at session scope
    settings = Settings(
        listen_host="127.0.0.1", listen_port=0, domains=[DOMAIN], tls_cert=str(tls["cert"]),
        tls_key=str(tls["key"]), data_root=str(root), storage_path=str(root / "_storage"),
        socket_dir=f"/tmp/pgsni-s-{root.name[-8:]}", postgres_options=dict(PG_OPTIONS),
        handshake_timeout=10.0, idle_timeout=300.0, shutdown_grace=2.0, admin_port=0, spare_clones=0,
        pg_bindir=pg_bindir())  # an install the Postgres OS user can reach (tests/conftest.py)
    gt = GatewayThread(settings).start()
    yield gt
    gt.stop()
    shutil.rmtree(settings.socket_path, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def target(client_gateway, tls, request) -> Target:
    """A fresh database named after the test module (test_node_pg -> node-pg)."""
    db = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")
    client_gateway.create_db(db)
    return Target(client_gateway.port, tls["ca"], db)


class TlsOpenings(logging.Handler):
    """Records (direct, sni, alpn) of each TLS opening from the gateway's debug line, the only
    place the gateway says whether a client used direct TLS."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[bool, str | None, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("TLS from ") and len(record.args) == 4:
            _peer, direct, sni, alpn = record.args
            self.seen.append((bool(direct), sni, alpn))


@contextmanager
def tls_openings():
    logger = logging.getLogger("pgsni.server")
    handler, level = TlsOpenings(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_scenarios(cmd: list[str], target: Target, timeout: float = 100) -> dict:
    """Run a scenario script that prints one JSON object {scenario: result} on its last line
    of stdout; each result carries "openings", the TLS openings the gateway saw meanwhile."""
    with no_session_crashes(Path(cmd[-1]).name), tls_openings() as seen:
        out = subprocess.run(cmd, env={**target.env(), **script_env()}, cwd=HERE, capture_output=True,
                             text=True, timeout=timeout)
    try:
        assert out.returncode == 0
        results = json.loads(out.stdout.strip().splitlines()[-1])
    except (AssertionError, IndexError, ValueError):
        pytest.fail(f"{' '.join(map(str, cmd))} exited {out.returncode} without a JSON line\n"
                    f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}", pytrace=False)
    for result in results.values():
        result["openings"] = [tuple(o) for o in seen]
    return results


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return path


def interpreter_scenarios(program: str, check: list[str], package: str, script: str,
                          target: Target) -> dict:
    """Run `script` with interpreter `program` once `program *check` shows its client library
    (Debian package `package`) is there."""
    path = require_program(program)
    if subprocess.run([path, *check], capture_output=True).returncode != 0:
        pytest.skip(f"{package} is not installed: {INSTALL_HINT}")
    return run_scenarios([path, str(HERE / script)], target)


def node_scenarios(script: str, package: str, target: Target) -> dict:
    """Run node/<script>, which needs npm package `package` in node/node_modules."""
    node = require_program("node")
    if not (NODE_DIR / "node_modules" / package / "package.json").exists():
        pytest.skip(f"npm package {package} is not installed in {NODE_DIR}: {INSTALL_HINT}")
    return run_scenarios([node, str(NODE_DIR / script)], target)


@pytest.fixture
def scenario(results):
    """name -> result, from a module's `results` fixture (one script run for the module)."""
    return results.__getitem__

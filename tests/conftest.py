"""Shared fixtures: TLS material (trustme), a data root Postgres can reach, a template PGDATA
made once per session, and a running gateway."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import trustme

from gateway.config import Settings
from gateway.compute.template import TemplateMaker
from storage.local import LocalCatalog, copy_tree
from storage.osuser import RunAs

from .support.harness import DOMAIN, GatewayThread
from .support.pginstalls import installs, pg_bindir, remove_mirror as remove_pg_mirror

# fsync=off is safe for tests (the OS cache survives a killed process); synchronous_commit
# stays on, or a SIGKILLed instance would lose commits a client saw.
PG_OPTIONS = {"fsync": "off"}


def reachable_tmpdir(prefix: str) -> Path:
    """A directory under /tmp that the Postgres OS user can traverse (pytest's own tmp_path
    is 0700 root-owned when tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o711)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_pg_mirror():
    yield
    remove_pg_mirror()


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert(f"*.{DOMAIN}", DOMAIN, "localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server-key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def template_catalog(root: Path) -> LocalCatalog:
    """A catalog on `root` that makes its templates as the gateway does (gateway/compute/template.py)."""
    run_as = RunAs.resolve("postgres")
    return LocalCatalog(root, run_as, TemplateMaker(
        installs(), run_as, Path(f"/tmp/pgsni-ts-{root.name[-8:]}"), options=dict(PG_OPTIONS)))


@pytest.fixture(scope="session")
def template_pgdata() -> Path:
    """One template (initdb, then the roles layout) per test session; each data root gets a copy."""
    root = reachable_tmpdir("pgsni-tpl-")
    tpl = template_catalog(root).template()
    yield tpl
    shutil.rmtree(root, ignore_errors=True)


def seed_template(root: Path, template_pgdata: Path) -> None:
    """Copy the session's template into data root `root` under the name its catalog looks
    for (`_template-<major>`), so a gateway on it does not make one of its own (a second)."""
    copy_tree(template_pgdata.parent, root / template_pgdata.parent.name)


@pytest.fixture
def data_root(template_pgdata) -> Path:
    root = reachable_tmpdir("pgsni-data-")
    seed_template(root, template_pgdata)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_settings(tls, data_root):
    def make(**kw) -> Settings:
        base = dict(listen_host="127.0.0.1", listen_port=0, domains=[DOMAIN],
                    tls_cert=str(tls["cert"]), tls_key=str(tls["key"]), data_root=str(data_root),
                    storage_path=str(data_root / "_storage"),
                    socket_dir=f"/tmp/pgsni-s-{data_root.name[-8:]}", postgres_options=dict(PG_OPTIONS),
                    pg_bindir=pg_bindir(),
                    handshake_timeout=10.0, idle_timeout=300.0, shutdown_grace=2.0,
                    admin_port=0,  # tests that want the admin API pass a free port
                    spare_clones=0)  # spares cost a 40 MB copy per create; tests/e2e/test_spares.py covers them
        base.update(kw)
        return Settings(**base)
    return make


@pytest.fixture
def start_gateway(make_settings):
    started: list[GatewayThread] = []

    def start(**kw) -> GatewayThread:
        gt = GatewayThread(make_settings(**kw)).start()
        started.append(gt)
        return gt

    yield start
    for gt in started:
        gt.stop()
        shutil.rmtree(gt.settings.socket_path, ignore_errors=True)


@pytest.fixture
def gateway(start_gateway) -> GatewayThread:
    return start_gateway()


class _SessionCrashes(logging.Handler):
    """Collects the gateway's 'session from ... failed' records: an exception nobody expected
    on a client's path (the client got XX000 "internal error in the gateway")."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.getMessage().startswith("session from"):
            self.records.append(record)


@contextlib.contextmanager
def no_session_crashes(what: str = "the test"):
    """Fail if an in-process gateway met an unexpected exception in a session meanwhile."""
    handler, logger = _SessionCrashes(), logging.getLogger("pgsni.session")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.records:
        exc = handler.records[0].exc_info[1]
        pytest.fail(f"a gateway session failed unexpectedly during {what} ({len(handler.records)} "
                    f"time(s)): {type(exc).__name__}: {exc}", pytrace=False)


@pytest.fixture(autouse=True)
def no_unexpected_session_errors():
    """Every test fails if an in-process gateway met an unexpected exception in a session."""
    with no_session_crashes():
        yield


def pytest_collection_modifyitems(config, items):
    """The longest tests first (marker `longest`): with several workers they then run beside
    the rest of the suite instead of alone at its end (the 10-minute busy-database test
    started two thirds in made the suite about 4 minutes longer)."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)

"""The README's first command, `./dev serve`, on a fresh clone as root: no .pgsni, no
certs/dev, the checkout in a directory the postgres user cannot enter (as a clone under /root
is). It comes up, psql connects to a new database (as the tenant role, no superuser), and
SIGTERM stops it cleanly."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from ..support.harness import DOMAIN, psql
from ..support.ports import free_port
from .conftest import ROOT, wait_listening
from .test_dev_serve_s3 import _dev_would_install


def _fresh_clone(parent: Path) -> Path:
    """The checkout's tracked files as they are now (what a clone of this commit holds), with
    the project's virtualenv linked in so that ./dev finds it set up."""
    clone = parent / "pgsni"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    assert not (clone / ".pgsni").exists() and not (clone / "certs" / "dev").exists()
    return clone


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="this is the as-root case")
def test_dev_serve_on_a_fresh_clone_as_root(tmp_path):
    reason = _dev_would_install()
    if reason and "development certificate" not in reason:  # a fresh clone makes its own
        pytest.skip(reason)
    home = Path(tempfile.mkdtemp(prefix="pgsni-root-home-", dir="/tmp"))  # 0700, like /root
    clone = _fresh_clone(home)
    data_dir = Path("/var/lib/pgsni-dev") / hashlib.sha256(str(clone).encode()).hexdigest()[:12]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSNI_", "AWS_"))}
    env |= {"PGSNI_ADMIN_PORT": "0", "PGSNI_POSTGRES_OPTIONS": "fsync=off", "PGSNI_LOG_FORMAT": "text"}
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["./dev", "serve", "--listen", f"127.0.0.1:{port}"], cwd=clone, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, log, "./dev serve to listen", timeout=120)
        dsn = (f"host=app1.{DOMAIN} hostaddr=127.0.0.1 port={port} user=postgres password=postgres "
               f"sslmode=verify-full sslrootcert={clone / 'certs' / 'dev' / 'ca.pem'} connect_timeout=30")
        out = psql(dsn, "select current_user, current_setting('is_superuser')")
        assert out.returncode == 0, out.stderr + log.read_text()
        assert out.stdout.strip() == "postgres|off"
        assert f"the databases live in {data_dir}" in log.read_text()
        assert (data_dir / "data" / "app1" / "pgdata" / "PG_VERSION").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)

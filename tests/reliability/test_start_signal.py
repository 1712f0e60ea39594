"""SIGTERM while the gateway is still starting (here: initdb of the template, made slow by a
wrapper) ends in an orderly shutdown with exit code 0, not the default kill (143)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from ..conftest import reachable_tmpdir
from ..e2e.test_shutdown import PGSNI, _toml_value
from ..support.harness import DOMAIN, wait_until
from ..support.pginstalls import install


@pytest.mark.slow
def test_sigterm_during_start_up_is_an_orderly_exit(tls, tmp_path):
    real = install().bindir
    bindir = reachable_tmpdir("pgsni-bin-")
    os.chmod(bindir, 0o755)
    for entry in real.iterdir():
        if entry.name not in ("initdb", "postgres"):
            (bindir / entry.name).symlink_to(entry)
    # a real file (not a link), or the bindir would be resolved back to the real one
    (bindir / "postgres").write_text(f"#!/bin/sh\nexec {real / 'postgres'} \"$@\"\n")
    os.chmod(bindir / "postgres", 0o755)
    signals = reachable_tmpdir("pgsni-mark-")
    os.chmod(signals, 0o777)  # initdb runs as the postgres OS user
    marker = signals / "initdb-started"
    (bindir / "initdb").write_text(f"#!/bin/sh\ntouch {marker}\nsleep 3\nexec {real / 'initdb'} \"$@\"\n")
    os.chmod(bindir / "initdb", 0o755)
    root = reachable_tmpdir("pgsni-data-")  # no template yet: start-up runs initdb
    settings = dict(domains=[DOMAIN], tls_cert=str(tls["cert"]), tls_key=str(tls["key"]),
                    data_root=str(root), socket_dir=f"/tmp/pgsni-t-{root.name[-8:]}",
                    storage_path=str(root / "_storage"), pg_bindir=str(bindir), admin_port=0,
                    listen_port=0)
    config = tmp_path / "pgsni.toml"
    config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSNI_")}
    proc = subprocess.Popen([str(PGSNI), "--config", str(config), "serve"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(marker.exists, timeout=60, what="start-up to reach initdb")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "stop requested during start-up" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(bindir, ignore_errors=True)
        shutil.rmtree(signals, ignore_errors=True)

"""A real moto S3 server in a subprocess on 127.0.0.1, for tests of the S3 backend.

`MotoServer.stop()` kills it and `start()` brings it back ON THE SAME PORT, so a test can
make "the bucket goes away, then comes back" happen under a live client. moto keeps all
state in memory: a restart loses every bucket and object, so re-create the bucket (with
`create_bucket(name)`) after `start()`.

The server and the sync boto3 client used for setup get dummy credentials passed
explicitly; nothing here reads the real AWS environment or config files' credentials.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config

from .ports import free_port

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


def _command(host: str, port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.exists():
        return [str(exe), "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


class MotoServer:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None
        self._logdir = Path(tempfile.mkdtemp(prefix="pgsni-moto-"))
        self.log_path = self._logdir / "moto.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "MotoServer":
        """Start (or restart) the server on self.port and wait until it answers HTTP."""
        if self.running:
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION=REGION)
        deadline = time.monotonic() + timeout
        while True:  # the port may still be held briefly by the previous instance
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(_command(self.host, self.port), env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
            log.close()
            if self._wait_ready(deadline):
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"moto server on port {self.port} did not start; log:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)

    def _wait_ready(self, deadline: float) -> bool:
        """True once the server answers; False if the process exited (port busy?)."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).close()
                return True
            except urllib.error.HTTPError:
                return True  # any HTTP answer means it is up
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Kill the server (all its state is lost). The port stays ours to restart on."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._logdir, ignore_errors=True)

    # --- setup helpers (sync boto3, dummy credentials) -------------------------------------------
    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))

    def create_bucket(self, name: str | None = None, *, versioning: bool = False) -> str:
        """Create a bucket (a fresh random name unless given) and return its name."""
        name = name or f"pgsni-test-{secrets.token_hex(6)}"
        c = self.client()
        c.create_bucket(Bucket=name)
        if versioning:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

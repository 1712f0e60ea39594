"""Other local users of the gateway machine are not trusted (SECURITY.md, threat model).

The admin API listens on loopback by default. Without admin_token it used to ask nobody for
anything: every local user (and every process of any uid: a service, a compromised daemon)
could list, dump, delete and re-password every database, and make the gateway (root) read any
local file or fetch any URL as an archive (`POST /v1/databases` with `source`). Now the
gateway generates a token into its data root, readable by its own OS user only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from gateway import admintoken

from ..support.adminclient import AdminClient
from ..conftest import reachable_tmpdir
from ..support.harness import TEST_PASSWORD, conninfo, psql
from ..support.ports import free_port

STRANGER = "nobody"


def _as_stranger(method: str, url: str, body: dict | None = None) -> str:
    """The HTTP status a request by another local user gets ("000": no connection)."""
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, url]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    return subprocess.run(args, user=STRANGER, group="nogroup", extra_groups=[], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}).stdout.strip()


def _read_as_stranger(path) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], user=STRANGER, group="nogroup", extra_groups=[],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user needs root")
def test_another_local_user_cannot_use_the_default_admin_api(start_gateway, tls):
    root = reachable_tmpdir("pgsni-local-users-")
    try:
        _another_local_user(start_gateway, tls, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _another_local_user(start_gateway, tls, root):
    gt = start_gateway(admin_port=free_port(), data_root=str(root))  # loopback, no admin_token
    gt.create_db("app1")
    root.chmod(0o755)  # even where others may list the data root, the token file is private
    (root / "readable").write_text("x")  # what the stranger can read there (the control)
    (root / "readable").chmod(0o644)
    base = f"http://127.0.0.1:{gt.settings.admin_port}"

    listed = _as_stranger("GET", f"{base}/v1/databases")
    changed = _as_stranger("POST", f"{base}/v1/databases/app1/password", {"password": "stranger-pw-123"})
    stolen = _read_as_stranger(admintoken.token_path(gt.settings))

    took_over = psql(conninfo(gt.port, tls["ca"], "app1", password="stranger-pw-123"), "select 1")
    assert took_over.returncode != 0, "another local user set the tenant's password and logged in as it"
    assert (listed, changed) == ("401", "401"), \
        f"another local user used the admin API: GET /v1/databases {listed}, POST password {changed}"
    assert stolen.returncode != 0 and "Permission denied" in stolen.stderr, stolen
    assert _read_as_stranger(root / "readable").stdout == "x", "the stranger reaches the data root"
    assert psql(conninfo(gt.port, tls["ca"], "app1", password=TEST_PASSWORD), "select 1").returncode == 0
    # the gateway's own user (an operator's pgsni, a script) uses the same token
    assert AdminClient.of(gt.settings).get("/v1/databases").status == 200


def _status(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_web_page_cannot_drive_the_admin_api(start_gateway):
    """A page in a browser on the gateway's machine: a cross-site POST needs no preflight when
    it is a simple request (it cannot read the answer, but the operation runs), and a page whose
    name was rebound to 127.0.0.1 (DNS rebinding) reads answers as its own origin. The admin
    API is for programs, never browsers: requests carrying a browser's Origin or a cross-site
    Sec-Fetch-Site are refused, and without a token so are requests naming another host."""
    gt = start_gateway(admin_port=free_port())  # the defaults: loopback, no admin_token
    gt.create_db("app1")
    base = f"http://127.0.0.1:{gt.settings.admin_port}"
    auth = {"Authorization": f"Bearer {admintoken.for_client(gt.settings)}"}
    assert _status(f"{base}/v1/databases", headers=auth) == 200  # a program on the machine: as before
    assert _status(f"{base}/v1/databases/app1/snapshot", "POST",
                   {**auth, "Origin": "https://evil.example", "Content-Type": "text/plain"}) == 403
    assert _status(f"{base}/v1/databases", headers={**auth, "Sec-Fetch-Site": "cross-site"}) == 403
    assert _status(f"{base}/v1/databases",
                   headers={**auth, "Host": f"evil.example:{gt.settings.admin_port}"}) == 403
    assert _status(f"{base}/healthz", headers={"Host": "evil.example"}) == 200  # probes stay open

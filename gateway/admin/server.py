"""The admin HTTP API on its own port (aiohttp, same event loop as the gateway): liveness,
readiness, Prometheus metrics and the database lifecycle under /v1 (gateway/admin/api.py).

/healthz and /readyz are open (load balancers and Fly.io checks); /metrics and /v1 need
`Authorization: Bearer <token>`: `admin_token`, or without it the token generated into the
data root (gateway/admintoken.py), which only the gateway's OS user can read. Settings refuse
a non-loopback admin_host without admin_token, so the API is never open to the network by a
token nobody chose."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

from aiohttp import web

from gateway import admintoken

from . import api as admin_api
from .view import GatewayView

log = logging.getLogger("pgsni.admin")

OPEN_PATHS = ("/healthz", "/readyz")
READY_CACHE_SECONDS = 2.0  # storage is probed at most this often, however often /readyz is asked
READY_PROBE_TIMEOUT = 1.5  # below the usual 2 s of load-balancer health checks
READY_PROBE_PREFIX = "dbs/readyz-probe/"  # listed, never written: proves the bucket answers


def json_error(status: int, kind: str, message: str, hint: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": kind, "message": message, "hint": hint}
    return web.json_response(body, status=status, headers=headers)


class Readiness:
    """Ready = accepting clients, TLS material loaded, storage reachable (probed at most every
    READY_CACHE_SECONDS, one probe at a time), not draining."""

    def __init__(self, gw: GatewayView) -> None:
        self.gw = gw
        self._checked_at = -1e9
        self._storage_error: str | None = None
        self._probe: asyncio.Task | None = None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        gw = self.gw
        checks: dict[str, Any] = {"listening": gw.listening, "tls": gw.ssl_context is not None,
                                  "draining": gw.shutting_down}
        if gw.shutting_down:
            return False, {"status": "draining", "reason": "the gateway is shutting down",
                           "checks": checks}
        if not checks["listening"]:
            return False, {"status": "starting", "reason": "not accepting clients yet",
                           "checks": checks}
        if not checks["tls"]:
            return False, {"status": "starting", "reason": "no TLS certificate loaded yet",
                           "checks": checks}
        error = await self._storage()
        checks["storage"] = error is None
        if error is not None:
            return False, {"status": "unavailable", "reason": f"storage unreachable: {error}",
                           "checks": checks}
        return True, {"status": "ready", "checks": checks}

    async def _storage(self) -> str | None:
        if time.monotonic() - self._checked_at < READY_CACHE_SECONDS:
            return self._storage_error
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe())
        return await asyncio.shield(self._probe)

    async def _run_probe(self) -> str | None:
        try:
            await asyncio.wait_for(self.gw.backend.list(READY_PROBE_PREFIX), READY_PROBE_TIMEOUT)
            error = None
        except asyncio.TimeoutError:
            error = f"no answer within {READY_PROBE_TIMEOUT:g} s"
        except Exception as e:  # StorageError, or anything else the backend lets through
            error = str(e) or type(e).__name__
        if error != self._storage_error:
            (log.warning if error else log.info)("readiness: storage %s",
                                                 f"unreachable: {error}" if error else "reachable again")
        self._storage_error, self._checked_at = error, time.monotonic()
        return error


def _token_ok(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # digests of both: equal lengths, and compare_digest's time does not depend on where they differ
    return scheme.lower() == "bearer" and hmac.compare_digest(
        hashlib.sha256(given.strip().encode()).digest(), hashlib.sha256(token.encode()).digest())


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def _from_a_browser(request: web.Request, token_chosen: bool, admin_host: str) -> str | None:
    """Why a request looks like a web page's, or None. A browser on the gateway's machine may
    send a page's simple requests (a cross-site POST needs no preflight: the operation runs,
    unread) or, after DNS rebinding, requests of the page's own origin whose answers it reads.
    Programs send no Origin and no Sec-Fetch-Site; and without admin_token the API listens on
    loopback only, so a Host that is not a loopback name is a rebound one."""
    if request.headers.get("Origin") is not None:
        return "requests from web pages (with an Origin header) are refused"
    if request.headers.get("Sec-Fetch-Site", "none") != "none":
        return "requests a browser sends for a web page are refused"
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    if not token_chosen and host.lower() not in (*_LOOPBACK_NAMES, admin_host, f"[{admin_host}]"):
        return f"without admin_token the admin API answers only to loopback names, not {host!r}"
    return None


def build_app(gw: GatewayView, token: str) -> web.Application:
    """The admin API's routes; /metrics and /v1 need `token` (never empty)."""
    assert token, "the admin API always needs a token"
    readiness = Readiness(gw)
    token_hint = ("Send the header Authorization: Bearer <admin_token>." if gw.settings.admin_token else
                  f"Send the header Authorization: Bearer <token>, the token being the content of "
                  f"{admintoken.token_path(gw.settings)} (readable by the gateway's OS user), or set "
                  "admin_token.")

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            if refused := _from_a_browser(request, bool(gw.settings.admin_token), gw.settings.admin_host):
                return json_error(403, "forbidden", refused,
                                  hint="The admin API is for programs (pgsni, curl, scripts), not browsers.")
            if not _token_ok(request.headers.get("Authorization"), token):
                return json_error(401, "unauthorized", "a valid bearer token is required",
                                  hint=token_hint,
                                  headers={"WWW-Authenticate": 'Bearer realm="pgsni"'})
        try:
            return await handler(request)
        except web.HTTPException as e:  # unknown paths, wrong methods: JSON like the rest
            if e.status < 400:
                raise
            return json_error(e.status, "not_found" if e.status == 404 else "invalid", e.reason,
                              headers={k: v for k, v in e.headers.items() if k == "Allow"})

    async def healthz(request: web.Request) -> web.Response:
        # answering at all proves the process and its event loop are alive
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, body = await readiness.check()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = gw.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application(middlewares=[guard], client_max_size=1 << 20)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    admin_api.add_routes(app, gw)
    return app


class AdminServer:
    def __init__(self, gw: GatewayView) -> None:
        self.gw = gw
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        s = self.gw.settings
        token = await asyncio.to_thread(admintoken.ensure, s)
        runner = web.AppRunner(build_app(self.gw, token), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, s.admin_host, s.admin_port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot listen on {s.admin_host}:{s.admin_port} for the admin API "
                          f"(admin_port; 0 turns it off): {e.strerror}") from None
        self._runner = runner
        self.port = runner.addresses[0][1] if runner.addresses else s.admin_port
        log.info("admin API on http://%s:%d (bearer token %s)", s.admin_host, self.port,
                 "admin_token" if s.admin_token else f"in {admintoken.token_path(s)}")

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_admin(gw: GatewayView) -> AdminServer | None:
    """Start the admin API unless admin_port is 0."""
    if not gw.settings.admin_port:
        return None
    admin = AdminServer(gw)
    await admin.start()
    return admin

"""One client session, from its first message to the end of the relay: startup, routing,
authentication, wake, backend login, pipe. Every refusal is an ErrorResponse with a SQLSTATE."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.roles import Role

from . import auth, dbroles, errors, relay, remote, routing
from . import protocol as p
from .cancel import CancelTarget
from .errors import GatewayError
from .metrics import auth_reason
from .wire import ConnectionClosed, PgConnection

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("pgsni.session")


@dataclass
class ClientInfo:
    peer: str
    tls: bool
    server_name: str | None = None
    cert_pem: str | None = None  # the certificate presented in this TLS handshake
    tls_version: str | None = None
    cipher: str | None = None

    def settings(self) -> dict[str, str]:
        """What the backend cannot know (it sees a unix socket), as custom settings a session
        reads with current_setting('pgsni.client_addr') and the like."""
        host, _, port = self.peer.rpartition(":")
        out = {"pgsni.client_addr": host.strip("[]"), "pgsni.client_port": port,
               "pgsni.tls": "on" if self.tls else "off"}
        if self.tls:
            out |= {"pgsni.tls_version": self.tls_version or "", "pgsni.tls_cipher": self.cipher or "",
                    "pgsni.server_name": self.server_name or ""}
        return out


@dataclass
class SessionLog:
    db_id: str | None = None
    method: str = "none"
    user: str | None = None
    auth: str = "none"  # none (not attempted), ok, failed
    auth_error: str | None = None  # the reason of a failure (metrics.auth_reason)
    wake_ms: float | None = None
    cold: bool = False  # this connection waited for its instance to start
    outcome: str = "closed"
    route: str = "local"  # local (an instance here) or remote (remote_routes)
    backend_pid: int | None = None  # joins this line to pg_stat_activity.pid


class Session:
    def __init__(self, gw: "Gateway", conn: PgConnection, client: ClientInfo,
                 refusal: GatewayError | None = None) -> None:
        self.gw, self.conn, self.client = gw, conn, client
        self.refusal = refusal  # a connection cap was reached at accept
        self.counted_db: str | None = None
        self.metered: tuple[str, str] | None = None  # (db, method) counted as authenticated
        self.log = SessionLog()
        self.started = time.monotonic()
        self.protocol_minor = 0  # 3.x the client speaks (3.2: long cancel keys)

    async def run(self) -> None:
        try:
            await self._run()
        except GatewayError as e:
            self.log.outcome = f"refused {e.code}"
            self.conn.send(e.response().encode())
        except p.ProtocolViolation as e:
            self.log.outcome = "protocol violation"
            self.conn.send(p.ErrorResponse(errors.PROTOCOL_VIOLATION, f"invalid message: {e}").encode())
        except relay.BackendRefused as e:
            self.log.outcome = f"backend refused {e.error.code}"
            self.conn.send(e.raw)
        except (ConnectionClosed, ConnectionError):
            self.log.outcome = "client left"
        except asyncio.TimeoutError:
            self.log.outcome = "handshake timeout"
            self.conn.send(p.ErrorResponse(errors.PROTOCOL_VIOLATION,
                                           "timed out waiting for the client to finish the handshake").encode())
        except Exception:
            self.log.outcome = "internal error"
            log.exception("session from %s failed", self.client.peer)
            self.conn.send(p.ErrorResponse(errors.INTERNAL_ERROR, "internal error in the gateway",
                                           hint="The gateway log has the details.").encode())
        finally:
            if self.counted_db is not None:
                self.gw.limits.per_db.release(self.counted_db)
            self.conn.close()
            self._meter_end()
            self._log_line()

    async def _run(self) -> None:
        s = self.gw.settings
        async with asyncio.timeout(s.handshake_timeout) as deadline:
            startup = await self._read_startup()
            if startup is None:
                return
            if self.refusal is not None:
                raise self.refusal
            db_id, backend_params = self._route(startup)
            limits, ip = self.gw.limits, self.client.peer.rpartition(":")[0]
            limits.enter_db(db_id)
            self.counted_db = db_id
            try:
                limits.check_auth(ip, db_id)  # before SCRAM, so a blocked attempt costs nothing
            except GatewayError:
                self.auth_failed("rate_limited")
                raise
            if db_id in s.remote_routes:  # an external Postgres; it checks the password itself
                backend = await remote.open_session(self, db_id, backend_params)
                deadline.reschedule(None)  # the handshake is over
                return await remote.serve(self, db_id, backend)
            role = await self._role(db_id, startup.params["user"])
            keys: asyncio.Future = asyncio.get_running_loop().create_future()
            early = self._early_login(db_id, role, backend_params, keys)
            try:
                keys.set_result(await auth.authenticate(
                    self.conn, startup.params["user"], role,
                    channel_binding_pem=(self.client.cert_pem or self.gw.cert_pem) if self.client.tls else None))
                self._check_role(db_id, role)
            except BaseException as e:
                keys.cancel()  # no proof is coming: a backend login waiting for one gives up
                if early is not None:
                    early.drop()
                if isinstance(e, GatewayError):
                    if e.code.startswith("28"):  # wrong password, unknown role, no login
                        limits.auth_failed(ip, db_id)
                    self.auth_failed(e.reason if isinstance(e, errors.AuthFailed) else
                                     auth_reason(e.code, e.message) or
                                     ("channel_binding" if "channel binding" in e.message else "other"))
                raise
            self.log.auth = "ok"
            self.meter_auth(db_id)
            self.conn.send(p.Authentication(p.AUTH_OK).encode())
        await self._serve(db_id, backend_params, keys, early)

    async def _read_startup(self) -> p.StartupMessage | None:
        event = await self.conn.next_event()
        if isinstance(event, p.CancelRequest):
            self.log.outcome = "cancel"
            self.gw.metrics.cancel(await self.gw.cancels.cancel(event))
            return None
        if not isinstance(event, p.StartupMessage):
            raise p.ProtocolViolation(f"unexpected {type(event).__name__} after the connection was set up")
        if event.major != 3:
            raise GatewayError(errors.FEATURE_NOT_SUPPORTED,
                               f"unsupported frontend protocol {event.major}.{event.minor}: "
                               f"server supports 3.0 to 3.{p.LATEST_MINOR}")
        # as Postgres 18: up to 3.2 is spoken as asked (its only difference, longer cancel
        # keys, is the gateway's own); anything newer is negotiated down
        self.protocol_minor = min(event.minor, p.LATEST_MINOR)
        unsupported = tuple(k for k in event.params if k.startswith("_pq_."))
        if event.minor > p.LATEST_MINOR or unsupported:
            self.conn.send(p.NegotiateProtocolVersion(self.protocol_minor, unsupported).encode())
        if not event.params.get("user"):
            raise GatewayError(errors.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        if not self.client.tls and self.gw.settings.require_tls:
            raise errors.tls_required()
        return event

    def _route(self, startup: p.StartupMessage) -> tuple[str, dict[str, str]]:
        params = startup.params
        route, options = routing.route(self.client.server_name, params.get("options"),
                                       self.gw.settings.domains)
        self.log.db_id, self.log.method, self.log.user = route.db_id, route.method, params["user"]
        params = dict(params)
        params.setdefault("database", params["user"])
        if route.db_id in self.gw.settings.remote_routes:
            return route.db_id, relay.backend_params(params, options)
        # last: startup parameters win over the client's options and its own pgsni.* ones
        clean = {k: v for k, v in params.items() if not k.startswith("pgsni.")}
        return route.db_id, relay.backend_params(clean, options) | self.client.settings()

    async def _role(self, db_id: str, user: str) -> Role | None:
        """The role to authenticate against; None (a mock exchange, then 28P01) for one that
        does not exist and for the gateway's own roles, which no client may use."""
        roles = await self.gw.instances.roles(db_id)
        if roles is None:
            if not self.gw.settings.create_on_connect:
                self.auth_failed("unknown_database")
                raise errors.unknown_database(db_id)
            # create-on-connect: the new database will have role postgres with the dev password
            return self.gw.dev_role if user == dbroles.TENANT else None
        return None if user in dbroles.RESERVED else roles.get(user)

    def _check_role(self, db_id: str, role: Role) -> None:
        """After the password: a database saved by an older pgsni (its roles not yet secured)
        and superusers are refused, unless the operator allows superusers for this database."""
        if role.superuser is None:
            raise errors.not_secured(db_id)
        if role.superuser and not self.gw.settings.superuser_login_allowed(db_id):
            raise errors.superuser_refused(role.name)

    def _early_login(self, db_id: str, role: Role | None, params: dict[str, str],
                     keys: asyncio.Future) -> "EarlyLogin | None":
        """Start the backend login while the client is still authenticating, so that the
        backend's fork and start-up overlap the SCRAM round trips. Only for an instance that
        is already running (an unauthenticated client never wakes one) and a role that can
        log in, and at most `EARLY_LOGINS_PER_DB` held per database at once, so that clients
        with wrong passwords cannot make Postgres fork without bound. The result is used
        only after authentication succeeds; otherwise it is dropped."""
        gw = self.gw
        inst = gw.instances.instances.get(db_id)
        if (role is None or not role.can_login or role.verifier is None or role.superuser is not False
                or inst is None or not inst.alive or gw.shutting_down
                or gw.early_logins.get(db_id, 0) >= EARLY_LOGINS_PER_DB):
            return None
        return EarlyLogin(gw, db_id, params, keys)

    async def _serve(self, db_id: str, params: dict[str, str], keys: asyncio.Future,
                     early: "EarlyLogin | None" = None) -> None:
        gw = self.gw
        if gw.shutting_down:
            if early is not None:
                early.drop()
            raise errors.shutting_down()
        woke = time.monotonic()
        got = await early.result() if early is not None else None
        if got is not None:
            inst, backend = got
            acquired = woke
        else:  # no early login, or the instance stopped meanwhile: wake it now
            inst, acquired, backend = await _wake_and_log_in(gw, db_id, params, keys)
        key = None
        try:
            done = time.monotonic()
            self.log.wake_ms = (done - woke) * 1000
            self.log.cold = inst.started_at >= woke
            if self.log.cold:
                gw.metrics.wake_phase("login", done - acquired)
                gw.metrics.wake_phase("total", done - woke)
            if backend.key is not None:
                self.log.backend_pid = backend.key.pid
                key = gw.cancels.issue(CancelTarget(inst.socket_path, backend.key),
                                       long=self.protocol_minor >= 2)
            out = b"".join(backend.to_client)
            if key is not None:
                out += key.encode()
            self.conn.send(out + backend.ready)
            self.log.outcome = "relayed"
            await relay.pipe(self.conn, backend.conn)
        finally:
            if key is not None:
                gw.cancels.forget(key)
            gw.instances.release(inst)

    # --- metrics and the one log line per connection ---------------------------------------------
    def auth_failed(self, reason: str) -> None:
        """Record a refused login (log line and metrics); also used by remote.py."""
        self.log.auth, self.log.auth_error = "failed", reason
        self.gw.metrics.auth_failed(reason)

    def meter_auth(self, db_id: str) -> None:
        """Count an authenticated connection under its database; also used by remote.py."""
        self.metered = (db_id, self.log.method)
        self.gw.metrics.connections.labels(*self.metered).inc()
        self.gw.metrics.connections_current.labels(*self.metered).inc()

    def _meter_end(self) -> None:
        m = self.gw.metrics
        if self.metered is not None:
            m.connections_current.labels(*self.metered).dec()
        elif self.log.outcome != "cancel":
            m.connections.labels("", self.log.method).inc()  # only real ids become label values
        m.client_bytes.labels("in").inc(self.conn.bytes_in)
        m.client_bytes.labels("out").inc(self.conn.bytes_out)

    def _log_line(self) -> None:
        l = self.log
        log.info("connection closed", extra={
            "event": "connection", "client": self.client.peer, "tls": self.client.tls,
            "db": l.db_id, "route": l.route, "sni_method": l.method, "user": l.user, "auth": l.auth,
            "backend_pid": l.backend_pid,
            "auth_error": l.auth_error,
            "wake_ms": round(l.wake_ms, 1) if l.wake_ms is not None else None, "cold": l.cold,
            "bytes_in": self.conn.bytes_in, "bytes_out": self.conn.bytes_out,
            "duration_s": round(time.monotonic() - self.started, 3), "outcome": l.outcome})


async def _log_in(gw: "Gateway", inst, params: dict[str, str], keys: asyncio.Future) -> relay.BackendSession:
    """The backend login on a held instance; if it fails or is cancelled, the instance is
    given back (relay.login closes its own connection)."""
    try:
        return await relay.login(inst.socket_path, params, gw.settings.start_timeout, keys)
    except BaseException:
        gw.instances.release(inst)
        raise


async def _wake_and_log_in(gw: "Gateway", db_id: str, params: dict[str, str], keys: asyncio.Future):
    """(instance, when it was acquired, backend session), starting the instance if need be.
    Passing states of the instance are waited out, up to `start_timeout`, instead of failing
    the client: a postmaster that turns out to be exiting (its socket already gone) is replaced
    by a new one, and one that refuses logins for now (57P03: starting up, crash recovery after
    a backend crashed, shutting down; or a login closed as crash recovery begins) is asked
    again until it accepts, or exits and is replaced. Past the deadline the client gets the
    last refusal as it was."""
    create = gw.dev_role.verifier if gw.dev_role is not None else None
    deadline = time.monotonic() + gw.settings.start_timeout
    waited = False
    while True:
        inst = await gw.instances.acquire(db_id, create_verifier=create)
        acquired = time.monotonic()
        try:
            return inst, acquired, await _log_in(gw, inst, params, keys)
        except relay.BackendUnreachable as e:
            if time.monotonic() >= deadline or not await gw.instances.exited(inst):
                raise
            log.warning("postgres for %s exited as a client logged in (%s); starting it again",
                        db_id, e.detail)
        except (relay.BackendRefused, relay.BackendClosed) as e:
            if not e.passing or time.monotonic() + LOGIN_RETRY_PAUSE >= deadline:
                raise
            if gw.shutting_down:
                raise errors.shutting_down() from None
            if not waited:
                waited = True
                log.warning("postgres for %s refused a login for now (%s); asking again until it "
                            "accepts (up to start_timeout)", db_id, e)
            await asyncio.sleep(LOGIN_RETRY_PAUSE)


# pause between logins to a postmaster that refused one for now (57P03)
LOGIN_RETRY_PAUSE = 0.1


# at most this many backend sessions per database may be logged in ahead of their clients'
# authentication (made or being made, not yet used or dropped)
EARLY_LOGINS_PER_DB = 8


class EarlyLogin:
    """One backend login started before its client authenticated: taken with `result()` once
    it has, or `drop()`ped (cancelled, or its backend session closed and the instance given
    back). Either frees its place under EARLY_LOGINS_PER_DB."""

    def __init__(self, gw: "Gateway", db_id: str, params: dict[str, str], keys: asyncio.Future) -> None:
        self.gw, self.db_id = gw, db_id
        gw.early_logins[db_id] = gw.early_logins.get(db_id, 0) + 1
        gw.early_logins_started += 1
        self.task = asyncio.create_task(self._login(params, keys))
        self._held = True

    async def _login(self, params: dict[str, str], keys: asyncio.Future):
        """(instance, backend session) for a database running now, or None if it no longer
        is, could not be reached or refused the login for now (the session then logs in the
        usual way, which restarts an instance that died meanwhile and waits out a passing
        refusal). Any other refusal by the backend (BackendRefused) is the client's answer
        either way, so it is passed on."""
        inst = await self.gw.instances.acquire_running(self.db_id)
        if inst is None:
            return None
        try:
            return inst, await _log_in(self.gw, inst, params, keys)
        except relay.BackendRefused as e:
            if e.passing:  # the session's own login waits it out
                return None
            raise
        except GatewayError as e:
            log.debug("early login to %s failed (%s); trying again after authentication", self.db_id, e)
            return None

    async def result(self):
        try:
            return await self.task
        except asyncio.CancelledError:
            self.drop()
            raise
        finally:
            self._free()

    def drop(self) -> None:
        def cleanup(t: asyncio.Task) -> None:
            self._free()
            if t.cancelled() or t.exception() is not None or t.result() is None:
                return  # nothing was kept (and an exception is now retrieved)
            inst, backend = t.result()
            backend.conn.close()
            self.gw.instances.release(inst)
        self.task.cancel()
        self.task.add_done_callback(cleanup)

    def _free(self) -> None:
        if self._held:
            self._held = False
            left = self.gw.early_logins.get(self.db_id, 1) - 1
            if left > 0:
                self.gw.early_logins[self.db_id] = left
            else:
                self.gw.early_logins.pop(self.db_id, None)

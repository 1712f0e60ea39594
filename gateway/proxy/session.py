"""One client session, from its first message to the end of the relay: startup, routing,
authentication, wake, backend login, pipe. Every refusal is an ErrorResponse with a SQLSTATE."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway import errors
from gateway.compute import dbroles
from gateway.errors import GatewayError
from gateway.metrics import auth_reason
from gateway.wire import protocol as p
from gateway.wire.link import HandedSession
from storage.roles import Role

from . import auth, login, relay, remote, routing
from .cancel import CancelTarget
from .conn import ConnectionClosed, PgConnection
from .context import ClientInfo, ProxyContext, SessionLog
from .login import EarlyLogin

# of the handshake's time, what is left for telling the client after storage did not answer
STORAGE_SLACK = 1.0

log = logging.getLogger("pgsni.session")


class Session:
    def __init__(self, gw: ProxyContext, conn: PgConnection, client: ClientInfo,
                 refusal: GatewayError | None = None) -> None:
        self.gw, self.conn, self.client = gw, conn, client
        self.refusal = refusal  # a connection cap was reached at accept
        self.counted_db: str | None = None
        self.metered: tuple[str, str] | None = None  # (db, method) counted as authenticated
        self.log = SessionLog()
        self.started = time.monotonic()
        self.protocol_minor = 0  # 3.x the client speaks (3.2: long cancel keys)
        self._mock: bytes | None = None  # keys the mock salts of roles that do not exist (auth.py)

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
            handed = await self._hand_over(db_id, startup)
            if handed is not None:
                deadline.reschedule(None)  # the holder's session has its own
                far, _link = handed
                return await relay.pipe(self.conn, far)
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
            role = await self._role(db_id, startup.params["user"], by=deadline.when() - STORAGE_SLACK)
            keys: asyncio.Future = asyncio.get_running_loop().create_future()
            early = self._early_login(db_id, role, backend_params, keys)
            try:
                keys.set_result(await auth.authenticate(
                    self.conn, startup.params["user"], role,
                    channel_binding_pem=(self.client.cert_pem or self.gw.cert_pem) if self.client.tls else None,
                    mock=self._mock))
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

    async def _hand_over(self, db_id: str, startup: p.StartupMessage) -> tuple[PgConnection, object] | None:
        """With a fleet, a client that named its database in its startup message only (no
        server name to forward it by before TLS), whose database another gateway serves:
        the link carrying the session there (forward.py); None to serve it here."""
        forwarding = self.gw.forwarding
        if forwarding is None or self.client.handed or self.log.method != "options" or not self.client.tls:
            return None
        handed = HandedSession(self.client.peer, self.client.tls_version or "", self.client.cipher or "",
                               self.client.cert_pem or self.gw.cert_pem or "")
        # as negotiated here already (NegotiateProtocolVersion was sent, if it had to be)
        first = p.StartupMessage(3, self.protocol_minor, {k: v for k, v in startup.params.items()
                                                          if not k.startswith("_pq_.")}).encode()
        max_length = self.gw.settings.max_message_size
        far = await forwarding.link_for(
            f"session of {self.client.peer} for {db_id}", lambda fresh: forwarding.serves_elsewhere(db_id, fresh),
            lambda address: forwarding.hand_session(address, handed, first, lambda: PgConnection(
                p.MessageReader(startup=False, max_length=max_length))))
        if far is not None:
            self.gw.metrics.forwarded("out")
            self.log.outcome = "handed to the gateway that serves its database"
        return far

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

    async def _role(self, db_id: str, user: str, by: float) -> Role | None:
        """The role to authenticate against; None (a mock exchange, then 28P01) for one that
        does not exist and for the gateway's own roles, which no client may use. Storage that
        has not answered by loop time `by` is the server's fault, told as such (57P03), not
        the client's handshake running out."""
        try:
            async with asyncio.timeout_at(by):
                roles = await self.gw.instances.roles(db_id, only=user)
        except TimeoutError:
            raise errors.storage_unavailable(db_id, "storage did not answer in time (reading the "
                                             "database's roles)") from None
        if roles is None:
            if not self.gw.settings.create_on_connect:
                self.auth_failed("unknown_database")
                raise errors.unknown_database(db_id)
            # create-on-connect: the new database will have role postgres with the dev password
            return self.gw.dev_role if user == dbroles.TENANT else None
        self._mock = auth.mock_secret(db_id, roles.get(dbroles.TENANT))
        return None if user in dbroles.RESERVED else roles.get(user)

    def _check_role(self, db_id: str, role: Role) -> None:
        """After the password: a database saved by an older pgsni (its roles not yet secured)
        and superusers are refused, unless the operator allows superusers for this database."""
        if role.superuser is None:
            raise errors.not_secured(db_id)
        if role.superuser and not self.gw.settings.superuser_login_allowed(db_id):
            raise errors.superuser_refused(role.name)

    def _early_login(self, db_id: str, role: Role | None, params: dict[str, str],
                     keys: asyncio.Future) -> EarlyLogin | None:
        """Start the backend login while the client is still authenticating, so that the
        backend's fork and start-up overlap the SCRAM round trips. Only for an instance that
        is already running (an unauthenticated client never wakes one) and a role that can
        log in, and at most `EARLY_LOGINS_PER_DB` (login.py) held per database at once, so that clients
        with wrong passwords cannot make Postgres fork without bound. The result is used
        only after authentication succeeds; otherwise it is dropped."""
        gw = self.gw
        inst = gw.instances.instances.get(db_id)
        if (role is None or not role.can_login or role.verifier is None or role.superuser is not False
                or inst is None or not inst.alive or gw.shutting_down
                or gw.early_logins.get(db_id, 0) >= login.EARLY_LOGINS_PER_DB):
            return None
        return EarlyLogin(gw, db_id, params, keys)

    async def _serve(self, db_id: str, params: dict[str, str], keys: asyncio.Future,
                     early: EarlyLogin | None = None) -> None:
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
            inst, acquired, backend = await login.wake_and_log_in(gw, db_id, params, keys)
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
                key = gw.cancels.issue(CancelTarget.local(inst.socket_path, backend.key),
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



"""What the sessions of one gateway share (`ProxyContext`), and the plain records of one
session: who the client is (`ClientInfo`) and what its log line says (`SessionLog`)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Protocol

from gateway.compute.instances import InstanceManager
from gateway.config import Settings
from gateway.metrics import Metrics
from storage.roles import Role

from .cancel import CancelTable
from .conn import PgConnection
from .forward import Forwarding
from .limits import Limits


@dataclass(eq=False)
class ProxyContext:
    settings: Settings
    instances: InstanceManager  # compute: wakes databases and reads their roles
    metrics: Metrics
    limits: Limits
    cancels: CancelTable = field(default_factory=CancelTable)
    dev_role: Role | None = None  # create_on_connect: role postgres of a database made on connect
    ssl_context: ssl.SSLContext | None = None  # the pair new handshakes present
    cert_pem: str | None = None  # its leaf certificate, for channel binding
    forwarding: Forwarding | None = None  # with a fleet: clients of databases held elsewhere go there
    shutting_down: bool = False
    sessions: set[asyncio.Task] = field(default_factory=set)
    early_logins: dict[str, int] = field(default_factory=dict)  # running ahead of auth, per db
    early_logins_started: int = 0  # (tests)


@dataclass
class ClientInfo:
    peer: str
    tls: bool
    server_name: str | None = None
    cert_pem: str | None = None  # the certificate presented in this TLS handshake
    tls_version: str | None = None
    cipher: str | None = None
    # another gateway (or worker) handed the client here, after its TLS ended there or before
    # it began: its session is never handed over again
    handed: bool = False

    def settings(self) -> dict[str, str]:
        """What the backend cannot know (it sees a unix socket), as custom settings a session
        reads with current_setting('pgsni.client_addr') and the like."""
        host, _, port = self.peer.rpartition(":")
        # every key, empty where it does not apply: startup parameters win over a client's own
        # `options=-c pgsni.*`, which would otherwise stand for a key left out
        tls = self.tls
        return {"pgsni.client_addr": host.strip("[]"), "pgsni.client_port": port,
                "pgsni.tls": "on" if tls else "off",
                "pgsni.tls_version": tls and self.tls_version or "", "pgsni.tls_cipher": tls and self.cipher or "",
                "pgsni.server_name": tls and self.server_name or ""}


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


class SessionView(Protocol):
    """What remote.py uses of a session (session.py's Session is one)."""

    gw: ProxyContext
    conn: PgConnection
    client: ClientInfo
    log: SessionLog
    protocol_minor: int

    def auth_failed(self, reason: str) -> None: ...

    def meter_auth(self, db_id: str) -> None: ...

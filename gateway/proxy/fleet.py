"""The links of one gateway to the others sharing its bucket, put together from the settings
(advertise_address, cluster_*): the internal listener, the directory of live peers, cancel
requests relayed both ways, clients forwarded to the gateway that holds their database
(forward.py), and the address and load this gateway publishes in its heartbeat.
The workers of one machine (gateway/workers.py) are such a fleet too, linked by unix sockets
(local_links.py) instead; the workers of a machine with advertise_address have both, each its
own internal listener and its local channel, and reach each other by the channel and every
other gateway by a link. Without either there is none of it (`Fleet.build` gives None)."""

from __future__ import annotations

import logging
from typing import Callable

from certs.cluster import link_client_context, link_server_context
from gateway.config import Settings
from gateway.wire.link import Kind
from gateway.workers import WorkerSlot
from storage.backend import Backend
from storage.errors import StorageError
from storage.leases import Leases

from .cancel import CancelTable
from .cancel_fleet import CancelRelay, answer_relayed
from .context import ProxyContext
from .forward import Forwarding
from .links import LinkServer, ServeHere, ServeSession
from .local_links import LocalChannel, TakePassed, local_address
from .peers import Peers, gateway_number

log = logging.getLogger("pgsni.fleet")


class Fleet:
    def __init__(self, settings: Settings, leases: Leases, proxy: ProxyContext, address: str,
                 forwarding: Forwarding, servers: "list[LinkServer | LocalChannel]", local: str = "") -> None:
        """`address`: published in the heartbeat (and `local`, a worker's channel beside a
        network address); `servers`: where the others reach this gateway (built by `build`)."""
        self.settings, self.leases, self.proxy, self.address, self.local = settings, leases, proxy, address, local
        self.cancels: CancelTable = proxy.cancels
        self.forwarding, self.servers = forwarding, servers
        self.peers = forwarding.peers
        self.relay = CancelRelay(self.peers, forwarding.ask)
        instances = proxy.instances
        self._running: Callable[[], int] = lambda: len(instances.instances)
        self._draining = False

    @classmethod
    def build(cls, settings: Settings, backend: Backend, leases: Leases, proxy: ProxyContext,
              serve_here: ServeHere, serve_session: ServeSession, slot: WorkerSlot | None = None,
              take_passed: TakePassed | None = None) -> "Fleet | None":
        """The links of a gateway with advertise_address (mutual TLS; `serve_here` and
        `serve_session`: the listener's entries for a client another gateway forwarded before
        its TLS, and for a session whose TLS ended there), or of worker `slot` of this
        machine (unix sockets; `take_passed`: its entry for a client socket another worker
        passed), or both; else None. TLSConfigError (certs/context.py) when the cluster
        certificates cannot be used."""
        s = settings
        worker = slot if slot is not None and take_passed is not None else None
        if worker is None and not s.advertise_address:
            return None
        metrics = proxy.metrics
        peers = Peers(backend, lambda: leases.holder, channel_dir=worker.channel_dir if worker else None)
        client = link_client_context(s.cluster_ca, s.cluster_cert, s.cluster_key) if s.advertise_address else None
        instances = proxy.instances
        forwarding = Forwarding(s, leases, peers, client, lambda db_id: db_id in instances.instances,
                                instances.full, metrics.passed)
        servers: list[LinkServer | LocalChannel] = []
        if worker is not None:
            servers.append(LocalChannel(worker.channel(), take_passed, proxy.cancels, metrics.link_request,
                                        serve_session, metrics.passed))
        if client is not None:
            servers.append(LinkServer(
                s.cluster_listen, link_server_context(s.cluster_ca, s.cluster_cert, s.cluster_key),
                {Kind.CANCEL: answer_relayed(proxy.cancels), Kind.SESSION: forwarding.session_handler(serve_session)},
                s.handshake_timeout, metrics.link_request, bare_handlers={Kind.FORWARD: forwarding.handler(serve_here)}))
        local = local_address(worker.channel()) if worker is not None else ""
        return cls(s, leases, proxy, s.advertise_address or local, forwarding, servers,
                   local if s.advertise_address else "")

    def _advertise(self) -> tuple[str, dict[str, int]]:
        load = {"running": self._running(), "max": self.settings.max_instances}
        if self._draining:
            load["draining"] = 1
        return self.address, load

    async def open(self) -> None:
        """Listen for peers, then tell them where: number this gateway's cancel keys, relay
        unknown ones, and publish the address in a heartbeat at once (a failed write is
        logged and retried by the lease loop)."""
        for server in self.servers:
            await server.open()
        self.cancels.gateway = gateway_number(self.leases.holder)
        self.cancels.elsewhere = self.relay
        self.proxy.forwarding = self.forwarding
        self.leases.advertise = self._advertise
        self.leases.advertise_local = self.local
        try:
            await self.leases.beat()
        except StorageError as e:
            log.warning("publishing this gateway's address failed (retried): %s", e)
        log.info("links to other gateways: listening on %s, published as %s (cancel key number %d)",
                 " and ".join(server.describe() for server in self.servers),
                 self.address + (f" and {self.local}" if self.local else ""), self.cancels.gateway)

    async def drain(self) -> None:
        """This gateway shuts down: say so in its heartbeat first (the others then wait for its
        databases' leases instead of sending it clients), then send its new clients, and
        refuse forwarded ones, to the gateways that take its databases over (forward.py)."""
        self._draining = True
        try:
            await self.leases.beat()
        except StorageError as e:
            log.warning("publishing that this gateway drains failed: %s", e)
        self.forwarding.draining = True
        log.info("draining: new clients go to the other gateways")

    async def close(self) -> None:
        self.cancels.elsewhere = None
        self.proxy.forwarding = None
        for server in self.servers:
            await server.close()

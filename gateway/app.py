"""The gateway as one process: storage, compute and the proxy built from the settings,
started in order, run until SIGTERM or SIGINT, and shut down gracefully (`run`, the CLI's
`serve`). The admin API is started first and stopped last."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvloop

from certs.context import leaf_certificate_pem, server_context
from certs.reload import CACHE_DIR, TLSMaterial
from gateway import supervise
from gateway.admin.server import start_admin
from gateway.compute import durability
from gateway.compute.instances import InstanceManager
from gateway.compute.template import local_catalog
from gateway.config import Settings
from gateway.metrics import MeteredBackend, Metrics
from gateway.proxy import remote
from gateway.proxy.context import ProxyContext
from gateway.proxy.fleet import Fleet
from gateway.proxy.limits import Limits
from gateway.proxy.server import Listener
from gateway.wire.scram import scram_verifier
from gateway.workers import METRICS_INTERVAL, Supervisor, WorkerSlot
from storage.cache import Databases
from storage.factory import attach_storage, open_backend, retry_budget, snapshot_store
from storage.leases import check_timing
from storage.local import LocalCatalog
from storage.roles import Role

MAINTAIN_INTERVAL = 10.0  # seconds between retries of failed saves and cache trims

log = logging.getLogger("pgsni.server")


class Gateway:
    def __init__(self, settings: Settings, slot: WorkerSlot | None = None) -> None:
        """`slot`: which worker of this machine this gateway is (gateway/workers.py), if any."""
        self.settings, self.slot = settings, slot
        self.catalog = local_catalog(settings)
        self.metrics = Metrics()
        self.backend = MeteredBackend(open_backend(settings), self.metrics)
        # with tls_from_storage, self.tls sets the context in start(), before listening
        self.tls = TLSMaterial(self.backend, settings.data_path / CACHE_DIR, settings.tls_reload_seconds,
                               on_change=self._use_tls, domain=settings.domains[0]) \
            if settings.tls_from_storage else None
        self.databases = open_databases(settings, self.catalog, self.backend)
        self.instances = InstanceManager(settings, self.databases)
        self.instances.metrics = self.metrics
        self.instances.after_create = self._refill_spares
        self.databases.store.on_transfer = self.metrics.snapshot
        dev_role = Role("postgres", scram_verifier(settings.dev_password), superuser=False) \
            if settings.create_on_connect else None
        self.proxy = ProxyContext(settings, self.instances, self.metrics, Limits(settings), dev_role=dev_role)
        if not settings.tls_from_storage:
            self.proxy.ssl_context = server_context(settings.tls_cert, settings.tls_key)
            self.proxy.cert_pem = leaf_certificate_pem(settings.tls_cert)
        self.listener = Listener(self.proxy)
        self.listener.reuse_port = slot is not None
        # links to the other gateways of the bucket (advertise_address) or workers, else None
        self.fleet = Fleet.build(settings, self.backend, self.instances.leases, self.proxy,
                                 self.listener.serve_forwarded, self.listener.serve_session, slot,
                                 self.listener.take_passed)
        self._spare_task: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._detach_storage = None  # storage=s3fs: the unmount, from start()
        self.admin = None  # gateway/admin/server.py's AdminServer, from start() unless admin_port=0
        self.metrics.track(self.metrics.instances_running, lambda: len(self.instances.instances))
        self.metrics.track(self.metrics.wal_lag_bytes, lambda: durability.lag(self.instances.instances.values())[0])
        self.metrics.track(self.metrics.wal_lag_seconds, lambda: durability.lag(self.instances.instances.values())[1])
        self.metrics.track(self.metrics.clients_open, lambda: len(self.proxy.sessions))

    # --- what the admin API and tests read -----------------------------------------------------
    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def listening(self) -> bool:
        return self.listener.listening

    @property
    def shutting_down(self) -> bool:
        return self.proxy.shutting_down

    @property
    def ssl_context(self):
        return self.proxy.ssl_context

    @property
    def cert_pem(self) -> str | None:
        return self.proxy.cert_pem

    @property
    def cancels(self):
        return self.proxy.cancels

    @property
    def limits(self) -> Limits:
        return self.proxy.limits

    @property
    def sessions(self) -> set[asyncio.Task]:
        return self.proxy.sessions

    @property
    def early_logins(self) -> dict[str, int]:
        return self.proxy.early_logins

    @property
    def early_logins_started(self) -> int:
        return self.proxy.early_logins_started

    # --- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        # storage=s3fs: mount the bucket (or check the existing mount) before storage is read
        self._detach_storage = await asyncio.to_thread(attach_storage, self.settings)
        try:
            self.admin = await start_admin(self)  # first: /healthz answers during a long start
            await self._start()
        except BaseException:
            if self.fleet is not None:  # its listener may be open already
                await self.fleet.close()
            await self._close_admin()
            await self._detach()
            raise

    async def _close_admin(self) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            await admin.close()

    async def _detach(self) -> None:
        detach, self._detach_storage = self._detach_storage, None
        if detach is not None:
            await asyncio.to_thread(detach)

    async def _start(self) -> None:
        s = self.settings
        check_timing(s.lease_seconds, self.instances.leases.margin, retry_budget(s))
        self.catalog.prepare()
        if self.tls is not None:  # TLSConfigError if storage has no usable pair
            await self.tls.load()
        await self.instances.stop_orphans()  # first: nothing may save a copy a postmaster runs on
        self.instances.recover()
        await asyncio.to_thread(self.catalog.template)  # made once; later creates only clone it
        await asyncio.to_thread(self.catalog.drop_spares)  # may be half-made or from an older template
        if self.fleet is not None:  # before clients: their cancel keys carry its number
            await self.fleet.open()
        self.listener.open()
        inst = self.instances
        loops = [("reap_idle", lambda: inst.reap_interval, inst.reap_idle),
                 ("maintain", lambda: MAINTAIN_INTERVAL, inst.maintain),
                 ("keep_leases", inst.leases.next_round, inst.keep_leases)]
        if self.tls is not None:
            tls = self.tls
            loops.append(("tls_reload", lambda: tls.interval, tls.check))
        if self.slot is not None and self.slot.index > 0:  # worker 0's admin API serves them
            loops.append(("publish_metrics", lambda: METRICS_INTERVAL, self._publish_metrics))
        elif self.slot is not None:
            self.metrics.workers = self.slot.others_metrics
        self._tasks = [asyncio.create_task(supervise.every(name, interval, step, self.metrics), name=name)
                       for name, interval, step in loops]
        log.info("pgsni listening on %s:%d for *.%s (data root %s, storage %s)", s.listen_host,
                 self.port, ", *.".join(s.domains), self.catalog.root, self.backend.describe())
        if s.create_on_connect:
            log.warning("DEVELOPMENT MODE: unknown databases are created on first connect with "
                        "password %r for role postgres (not a superuser). Never use this in "
                        "production.", s.dev_password)
            self._refill_spares()
        if (s.allow_superuser_login or s.superuser_login_databases) and not s.instance_uid_base:
            log.warning("superuser logins are allowed and every database runs as one OS user: a "
                        "superuser can read and change every other database on this machine")

    async def _publish_metrics(self) -> None:
        assert self.slot is not None
        await asyncio.to_thread(self.slot.publish_metrics, self.metrics.text())

    def _refill_spares(self) -> None:
        """Keep `spare_clones` copies of the template ready (in a thread, one refill at a time),
        so that creating a database is a rename instead of a copy of ~1000 files and a sync of
        them (a spare is synced as it is made, here, off the create's path)."""
        if self.settings.spare_clones > 0 and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.ensure_future(asyncio.to_thread(self._fill_spares))

    def _fill_spares(self) -> None:
        try:
            self.catalog.fill_spares(self.settings.spare_clones)
        except Exception as e:  # a spare is an optimisation: never let it hurt a create
            log.warning("could not prepare a spare copy of the template: %s", e)

    def _use_tls(self, material: TLSMaterial) -> None:
        """A new pair from storage: new connections get it, open ones keep theirs."""
        self.proxy.ssl_context, self.proxy.cert_pem = material.context, material.cert_pem

    # --- run and stop --------------------------------------------------------------------------
    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop accepting, let clients finish for `shutdown_grace` seconds, then stop every
        instance with a fast shutdown (clients get Postgres' own termination message), save
        it and give its lease up. In a fleet, drain instead of closing the door: new clients
        go to the gateways that take the databases over (forward.py) until all is saved."""
        if self.proxy.shutting_down:
            await self._stopped.wait()
            return
        self.proxy.shutting_down = True
        sessions = self.proxy.sessions
        log.info("shutting down: %d client(s) connected", len(sessions))
        try:
            if self.fleet is not None:
                await self.fleet.drain()
            # the loops end before the instances stop: a reaper mid-save is awaited, not lost;
            # but the lease heartbeat goes on until they have stopped, saved and given their
            # leases up (a fast shutdown may take stop_timeout, longer than a lease stays valid)
            leases = [t for t in self._tasks if t.get_name() == "keep_leases"]
            await supervise.cancel_all([t for t in self._tasks if t not in leases])
            if self.fleet is None:  # a fleet's gateway drains: its new clients go to the others
                await self.listener.close()
            if sessions:
                await asyncio.wait(list(sessions), timeout=self.settings.shutdown_grace)
            try:
                await self.instances.stop_all()
            finally:
                await supervise.cancel_all(leases)
            await self.listener.close()
            if self.fleet is not None:  # after the instances: their cancels arrive until then
                await self.fleet.close()
            remote.close_all(self.proxy)  # remote routes' clients: no instance here to terminate them
            if sessions:
                await asyncio.wait(list(sessions), timeout=5)
            for t in list(sessions):
                t.cancel()
            await self.backend.close()
            await self._detach()
        except Exception:  # noqa: BLE001  (an orderly exit all the same)
            log.exception("shutting down met an error; stopping anyway")
        finally:
            await self._close_admin()  # last: /readyz said "draining" until here
            self._stopped.set()
        log.info("stopped")


def open_databases(settings: Settings, catalog: LocalCatalog, backend) -> Databases:
    return Databases(catalog, snapshot_store(settings, backend),
                     budget_bytes=settings.cache_budget_mb << 20,
                     cache_seconds=settings.auth_cache_seconds)


def serve(settings: Settings) -> None:
    """The CLI's `serve`: one gateway, or with workers > 1 a supervisor of that many."""
    if settings.worker_count > 1:
        if code := Supervisor(settings, run).run():
            raise SystemExit(code)
    else:
        run(settings)


def run(settings: Settings, slot: WorkerSlot | None = None) -> None:
    """Run the gateway (or worker `slot` of this machine) until SIGTERM or SIGINT."""

    async def main() -> None:
        gw = Gateway(settings, slot)
        loop = asyncio.get_running_loop()
        stop_requested = False

        def on_signal() -> None:
            nonlocal stop_requested
            stop_requested = True
            if starting.done():
                asyncio.ensure_future(gw.shutdown())

        # handlers before start-up (which can take seconds: initdb, orphans, recovery), so a
        # SIGTERM then still ends in an orderly shutdown rather than the default kill
        starting = asyncio.ensure_future(gw.start())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await starting
        if stop_requested:
            log.info("stop requested during start-up")
            await gw.shutdown()
            return
        started = time.monotonic()
        await gw.serve_forever()
        log.debug("served for %.0fs", time.monotonic() - started)

    uvloop.run(main())

"""Prometheus metrics of one gateway, in its own registry (several gateways in one process,
as in tests, do not share counters). Served by the admin API at /metrics.

Label values are bounded: the `database` label only ever holds ids that authenticated (real
databases), never whatever a client typed as an SNI name."""

from __future__ import annotations

import inspect
from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector)
from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from storage import errors as storage_errors

# wakes are tens of milliseconds when the copy is local, seconds when it comes from storage
WAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SNAPSHOT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CANCEL_RESULTS = ("forwarded", "relayed", "dropped", "unknown")

# SQLSTATEs and message fragments of gateway refusals -> auth failure reasons
_AUTH_REASONS = (("28P01", "", "password"), ("28000", "not permitted", "no_login"), ("28000", "", "other"),
                 ("3D000", "", "unknown_database"))


def auth_reason(code: str, message: str) -> str | None:
    """The auth failure reason of a refusal with this SQLSTATE, or None if it is not one."""
    for want, fragment, reason in _AUTH_REASONS:
        if code == want and fragment in message:
            return reason
    return None


def storage_error_kind(exc: BaseException) -> str:
    for cls, kind in ((storage_errors.StorageUnavailable, "unavailable"),
                      (storage_errors.CorruptArchive, "corrupt"),
                      (storage_errors.PreconditionFailed, "conflict"),
                      (storage_errors.NotFound, "not_found")):
        if isinstance(exc, cls):
            return kind
    return "other"


class Metrics:
    def __init__(self) -> None:
        # worker 0 of several (gateway/workers.py): the other workers' expositions by index
        self.workers: Callable[[], dict[str, str]] | None = None
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        self.connections = Counter(
            "pgsni_connections", "Client connections, counted when they authenticate (database = "
            "its id) or when they end without authenticating (database empty).",
            ["database", "sni_method"], registry=r)
        self.connections_current = Gauge(
            "pgsni_connections_current", "Authenticated client connections open now.",
            ["database", "sni_method"], registry=r)
        self.clients_open = Gauge(
            "pgsni_client_connections_open", "Client connections open now, authenticated or not.",
            registry=r)
        self.auth_failures = Counter(
            "pgsni_auth_failures", "Refused logins by reason: password, unknown_role, no_login, "
            "unknown_database, rate_limited, channel_binding, other.", ["reason"], registry=r)
        self.wakeups = Counter(
            "pgsni_wakeups", "Postgres instance starts, by result (ok, failed).", ["result"],
            registry=r)
        self.wake_seconds = Histogram(
            "pgsni_wake_seconds", "Latency of waking a database, by phase: restore (download from "
            "storage), start (postmaster ready), login (backend login after a wake), total (what "
            "the client waited).", ["phase"], buckets=WAKE_BUCKETS, registry=r)
        self.instances_running = Gauge(
            "pgsni_instances_running", "Postgres instances running now.", registry=r)
        self.wal_lag_bytes = Gauge(
            "pgsni_wal_lag_bytes", "durability=async or sync: the largest amount of WAL a running database "
            "has written that is not in storage yet.", registry=r)
        self.wal_lag_seconds = Gauge(
            "pgsni_wal_lag_seconds", "durability=async or sync: the longest time a running database's "
            "storage has been behind its WAL (alert well above rpo_seconds).", registry=r)
        self.wal_sync_fallbacks = Counter(
            "pgsni_wal_sync_fallbacks", "durability=sync, sync_fallback=async: times a database "
            "went on acknowledging commits before storage held them (storage took no WAL for "
            "sync_timeout_seconds).", registry=r)
        self.wal_sync_failed_commits = Counter(
            "pgsni_wal_sync_failed_commits", "durability=sync, sync_fallback=fail: sessions ended "
            "because their commit waited sync_timeout_seconds for storage (never acknowledged).",
            registry=r)
        self.wal_lost_bytes = Counter(
            "pgsni_wal_lost_bytes", "durability=async or sync: WAL Postgres removed before storage "
            "held it (storage took none while more than wal_keep_mb was written and the spool was "
            "over its budget): a restore to a point in it, or one after losing the node before the "
            "database's next version, cannot have it.", registry=r)
        self.snapshot_bytes = Counter(
            "pgsni_snapshot_bytes", "Compressed snapshot bytes moved, by operation (save, restore).",
            ["operation"], registry=r)
        self.snapshot_seconds = Histogram(
            "pgsni_snapshot_seconds", "Duration of snapshot saves and restores.", ["operation"],
            buckets=SNAPSHOT_BUCKETS, registry=r)
        self.storage_errors = Counter(
            "pgsni_storage_errors", "Storage failures seen by the gateway, by kind (unavailable, "
            "corrupt, conflict, not_found, other).", ["kind"], registry=r)
        self.cancels = Counter(
            "pgsni_cancel_requests", "CancelRequests received from clients, by result (forwarded: to a "
            "backend here; relayed: to the other gateways; dropped: over the relay's limits; unknown).",
            ["result"], registry=r)
        self.client_bytes = Counter(
            "pgsni_client_bytes", "Bytes exchanged with clients after TLS, by direction (in: from "
            "clients, out: to clients), counted when connections close.", ["direction"], registry=r)
        self.link_requests = Counter(
            "pgsni_link_requests", "Requests from other gateways on the internal listener, by kind "
            "(cancel, forward: a client handed over before its TLS, session: one handed over after "
            "it, or invalid: not readable) and result (done, refused, incomplete: the peer sent no "
            "whole request in time or left).", ["kind", "result"], registry=r)
        self.forwarded_clients = Counter(
            "pgsni_forwarded_clients", "Client connections forwarded between gateways before TLS, by "
            "direction (out: to the gateway that holds the database; in: from another gateway).",
            ["direction"], registry=r)
        self.passed_clients = Counter(
            "pgsni_passed_clients", "Of pgsni_forwarded_clients, those passed between the workers of "
            "this machine over their local channel (the client's socket, or a socket pair for a "
            "session) rather than over a link to another machine, by direction.",
            ["direction"], registry=r)
        self.background_errors = Counter(
            "pgsni_background_errors", "Unexpected errors in the gateway's background loops, by "
            "loop (reap_idle, maintain, keep_leases, tls_reload); each loop goes on.", ["loop"],
            registry=r)
        for result in ("ok", "failed"):  # so that rates exist before the first event
            self.wakeups.labels(result)
        for op in ("save", "restore"):
            self.snapshot_bytes.labels(op)
        for result in CANCEL_RESULTS:
            self.cancels.labels(result)
        for direction in ("in", "out"):
            self.client_bytes.labels(direction)
            self.forwarded_clients.labels(direction)
            self.passed_clients.labels(direction)

    # --- hooks called where the events happen ---------------------------------------------------
    def wake_phase(self, phase: str, seconds: float) -> None:
        self.wake_seconds.labels(phase).observe(seconds)

    def wake(self, ok: bool) -> None:
        self.wakeups.labels("ok" if ok else "failed").inc()

    def snapshot(self, operation: str, size: int, seconds: float) -> None:
        self.snapshot_bytes.labels(operation).inc(size)
        self.snapshot_seconds.labels(operation).observe(seconds)

    def wal_event(self, event: str, count: int = 1) -> None:
        """WAL shipping (walship.py): durability=sync's "fallback" to async or "failed_commits"
        ended unacknowledged, or "lost_bytes" of WAL removed before storage held it."""
        {"fallback": self.wal_sync_fallbacks, "failed_commits": self.wal_sync_failed_commits,
         "lost_bytes": self.wal_lost_bytes}[event].inc(count)

    def storage_error(self, exc: BaseException) -> None:
        self.storage_errors.labels(storage_error_kind(exc)).inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def link_request(self, kind: str, result: str) -> None:
        self.link_requests.labels(kind, result).inc()

    def cancel(self, result: str) -> None:
        self.cancels.labels(result).inc()

    def forwarded(self, direction: str) -> None:
        self.forwarded_clients.labels(direction).inc()

    def passed(self, direction: str) -> None:
        self.passed_clients.labels(direction).inc()

    def track(self, gauge: Gauge, value: Callable[[], float]) -> None:
        gauge.set_function(value)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper asked for (Accept header): Prometheus text 0.0.4 by
        default, OpenMetrics when requested. Returns (body, content type). With `workers`
        set (worker 0 of several), every worker's metrics, each sample labelled by worker."""
        encoder, content_type = choose_encoder(accept)
        if self.workers is None:
            return encoder(self.registry), content_type
        return encoder(_Merged({"0": self.text(), **self.workers()})), content_type

    def text(self) -> str:
        """This gateway's metrics in Prometheus text format (what a worker publishes)."""
        return generate_latest(self.registry).decode()


class _Merged:
    """A registry stand-in for the encoders: several workers' expositions as one, every sample
    with a `worker` label (the families merged by name, so HELP and TYPE appear once; the
    `_created` series left out)."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        for worker, text in self.texts.items():
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue  # a damaged file of a worker: its metrics are left out this time
            for fam in parsed:
                if fam.type == "gauge" and fam.name.endswith("_created"):
                    continue  # a counter's or histogram's creation time: noise across workers
                merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                merged.samples += [s._replace(labels={**s.labels, "worker": worker}) for s in fam.samples]
        return families.values()


class MeteredBackend:
    """Wraps a storage backend to count its failed requests (after the backend's own
    retries) in pgsni_storage_errors. NotFound and PreconditionFailed are answers, not
    failures. Every other attribute is the wrapped backend's own."""

    _QUIET = (storage_errors.NotFound, storage_errors.PreconditionFailed)

    def __init__(self, inner, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @property
    def inner(self):
        return self._inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name == "download":
            return self._download
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args, **kwargs):
            try:
                return await attr(*args, **kwargs)
            except storage_errors.StorageError as e:
                self._count(e)
                raise

        return call

    async def _download(self, key: str):
        try:
            async for chunk in self._inner.download(key):
                yield chunk
        except storage_errors.StorageError as e:
            self._count(e)
            raise

    def _count(self, exc: BaseException) -> None:
        if not isinstance(exc, self._QUIET):
            self._metrics.storage_error(exc)

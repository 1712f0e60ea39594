"""`pgsni serve` with `workers` > 1: a fleet on one machine (issue 17). The supervisor (this
process) forks N workers; each is a whole gateway (gateway/app.py) on the same listen port
(SO_REUSEPORT: the kernel spreads new connections over them) with a data root, holder name,
share of max_instances, cache budget and instance uids of its own. The bucket's leases say
which worker serves a database, exactly as between machines; a worker that receives a client
of a database another holds passes the client's socket to it over a local datagram socket
(gateway/proxy/local_links.py) before TLS begins.

The supervisor holds no database and no socket of a client. It restarts a worker that exits
without being asked to (its postmasters left behind are stopped by the new worker, which
reopens the databases it held: its holder name is kept in its data root), and on SIGTERM or
SIGINT it passes the signal on to every worker, which drains as a single gateway does, and
exits once all have."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Settings, with_port_offset

log = logging.getLogger("pgsni.workers")

RESTART_PAUSE = 1.0  # before restarting a worker; doubled while it keeps dying young, up to
RESTART_PAUSE_MAX = 30.0
YOUNG = 10.0  # a worker that exits sooner after its start than this counts as dying young
POLL = 0.2  # seconds between looks at the workers (and at a stop signal)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
METRICS_INTERVAL = 5.0  # seconds between a worker's metrics files for worker 0's /metrics
METRICS_STALE = 3 * METRICS_INTERVAL
WORKER_ROOT = ".worker-"  # worker i > 0 keeps its data in <data_root>/.worker-<i> (not a database id)


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker a gateway process is, and where the workers reach each other."""

    index: int
    count: int
    channel_dir: Path  # each worker's local socket is <channel_dir>/<index>.sock

    def channel(self, index: int | None = None) -> Path:
        return self.channel_dir / f"{self.index if index is None else index}.sock"

    # --- metrics: each worker > 0 publishes its own, worker 0's admin API serves them all ------
    def publish_metrics(self, text: str) -> None:
        """Write this worker's metrics for worker 0 (atomically: a reader sees a whole file)."""
        path = self.channel_dir / f"{self.index}.prom"
        tmp = path.with_suffix(".prom.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def others_metrics(self) -> dict[str, str]:
        """The other workers' metrics by index, left out when older than METRICS_STALE (a
        worker that died or hangs)."""
        out = {}
        now = time.time()
        for index in range(self.count):
            path = self.channel_dir / f"{index}.prom"
            try:
                if index != self.index and now - path.stat().st_mtime < METRICS_STALE:
                    out[str(index)] = path.read_text()
            except OSError:
                pass
        return out


def channel_dir(settings: Settings, token: str) -> Path:
    """The workers' sockets: beside the instances' socket directory (a short path), 0700,
    named with a token of their supervisor's own. The workers tell a sibling's channel from
    another machine's by it (proxy/peers.py): two machines (containers) with the same host
    name and data root would otherwise name the same path, each on its own /tmp."""
    return Path(f"{settings.socket_path}-w-{token}")


def worker_settings(settings: Settings, index: int, count: int) -> Settings:
    """Worker `index`'s settings. Worker 0 keeps the data root (so a single gateway that gains
    workers keeps its holder name and local copies), the admin port and the gateway_id; the
    others get their own under the data root, no admin server, and gateway_id-<index>. The
    machine's max_instances, cache_budget_mb and instance uids are split evenly. With links to
    other machines, worker i listens on port + i of cluster_listen and publishes port + i of
    advertise_address (config.py checks that the ports [p, p + N) are free to use)."""
    s = settings
    uids = s.instance_uid_count // count
    changes: dict = {"workers": 1, "max_instances": max(1, s.max_instances // count),
                     "cache_budget_mb": max(1, s.cache_budget_mb // count) if s.cache_budget_mb else 0,  # 0: none
                     "instance_uid_base": s.instance_uid_base + index * uids if s.instance_uid_base else 0,
                     "instance_uid_count": max(1, uids)}
    if s.advertise_address:
        changes |= {"cluster_listen": with_port_offset(s.cluster_listen, index),
                    "advertise_address": with_port_offset(s.advertise_address, index)}
    if index:
        changes |= {"data_root": str(s.data_path / f"{WORKER_ROOT}{index}"), "admin_port": 0,
                    "socket_dir": f"{s.socket_dir}-{index}" if s.socket_dir else "",
                    "gateway_id": f"{s.gateway_id[:58]}-{index}" if s.gateway_id else ""}
    return dataclasses.replace(s, **changes)


RunWorker = Callable[[Settings, WorkerSlot], None]


class Supervisor:
    def __init__(self, settings: Settings, run_worker: RunWorker) -> None:
        """`run_worker(settings, slot)`: one worker's whole life (gateway/app.py's run)."""
        self.settings, self.run_worker = settings, run_worker
        self.count = settings.worker_count
        self.channel_dir = channel_dir(settings, secrets.token_hex(4))
        self.workers: dict[int, int] = {}  # pid -> index
        self.started: dict[int, float] = {}  # index -> when its current process began
        self.pause: dict[int, float] = {}  # index -> its next restart pause
        self.due: dict[int, float] = {}  # index -> when it is restarted
        self.spawned: dict[int, int] = {}  # index -> processes started for it
        self.stopping = False
        self.restarts = 0
        self.exit_code = 0
        self.signalled = 0  # SIGTERM or SIGINT came: the loop stops the workers

    def run(self) -> int:
        """Start the workers, keep them running until SIGTERM or SIGINT, then drain them."""
        self.channel_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.channel_dir, 0o700)
        self.settings.data_path.mkdir(parents=True, exist_ok=True)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        log.info("pgsni supervising %d workers on %s:%d", self.count, self.settings.listen_host,
                 self.settings.listen_port)
        for index in range(self.count):
            self._spawn(index)
        while self.workers or (self.due and not self.stopping):
            self._stopping_now()
            self._reap()
            now = time.monotonic()
            for index, when in list(self.due.items()):
                if now >= when and not self.stopping:
                    del self.due[index]
                    self._spawn(index)
            time.sleep(POLL)
        shutil.rmtree(self.channel_dir, ignore_errors=True)  # their sockets and metrics files
        log.info("all workers stopped")
        return self.exit_code

    def _on_signal(self, signum: int, _frame) -> None:
        """Noted, and acted on by the loop (`_stopping_now`): run at once, it could fall
        between a worker's fork and the note of its pid, and stop every worker but that one."""
        self.signalled = self.signalled or signum

    def _stopping_now(self) -> None:
        if self.signalled and not self.stopping:
            log.info("stopping %d workers (%s)", len(self.workers), signal.Signals(self.signalled).name)
            self._stop()

    def _stop(self) -> None:
        self.stopping = True
        self.due.clear()
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d (pid %d) stopped (%s)", index, pid, _how(code))
                continue
            young = time.monotonic() - self.started[index] < YOUNG
            if code == 1 and young and self.spawned[index] == 1:  # its first start failed: the
                log.error("worker %d could not start (%s): stopping", index, _how(code))  # settings?
                self.exit_code = 1
                self._stop()
                continue
            pause = min(self.pause.get(index, RESTART_PAUSE / 2) * 2, RESTART_PAUSE_MAX) if young else RESTART_PAUSE
            self.pause[index] = pause
            self.due[index] = time.monotonic() + pause
            self.restarts += 1
            log.error("worker %d (pid %d) exited (%s); restarting it in %.0f s", index, pid, _how(code), pause)

    def _spawn(self, index: int) -> None:
        """Fork worker `index`. SIGTERM and SIGINT are blocked across the fork: one that
        reached the new worker before it set its own handlers would run the supervisor's
        there, and one the interpreter took in just as the worker set them is dropped ("ignored
        due to race condition"): the worker would miss its stop. It gets them once its
        handlers are the default ones."""
        slot = WorkerSlot(index, self.count, self.channel_dir)
        settings = worker_settings(self.settings, index, self.count)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                _die_with_parent()
                self.run_worker(settings, slot)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception as e:  # noqa: BLE001  (logged; the supervisor restarts it)
                log.error("worker %d failed: %s", index, e, exc_info=not isinstance(e, OSError))
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = index
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.started[index] = time.monotonic()
        self.spawned[index] = self.spawned.get(index, 0) + 1
        log.info("worker %d started (pid %d, data root %s)", index, pid, settings.data_root)


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _die_with_parent() -> None:
    """A worker gets SIGTERM (and drains) when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

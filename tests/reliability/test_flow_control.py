"""Flow control holds the gateway's memory flat. A real `pgsni serve` process (so its RSS can
be read from /proc) relays 1 GiB of COPY FROM STDIN while its backend is frozen (SIGSTOP) for
a few seconds in the middle, and 1 GiB of COPY TO STDOUT to a client that stops reading for a
few seconds at a time. The gateway must stop reading from the fast side instead of buffering:
its resident memory may grow by no more than a few tens of MB."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from ..e2e.test_shutdown import DEV_PASSWORD, serve  # noqa: F401  (fixture)
from ..support.harness import conninfo

GIB = 1 << 30
ROW = b"x" * 8191 + b"\n"  # 8 KiB per row
BLOCK = ROW * 128  # 1 MiB per write
MAX_GROWTH = 50 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


class RSSSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self.baseline = _rss(pid)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            self.samples += 1
            time.sleep(0.02)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak - self.baseline


def _warm_up(dsn: str) -> None:
    """Connect and push some data once, so buffers that stay allocated exist before the baseline."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table if not exists sink (x text)")
        with conn.cursor().copy("copy sink from stdin where false") as cp:
            for _ in range(32):
                cp.write(BLOCK)
        with conn.cursor().copy("copy (select repeat('x', 8191) from generate_series(1, 4096)) to stdout") as cp:
            for _ in cp:
                pass


@pytest.mark.slow
def test_copy_in_with_a_frozen_backend_keeps_gateway_memory_flat(serve, tls):  # noqa: F811
    gp = serve(log_level="INFO")
    dsn = conninfo(gp.port, tls["ca"], "app1", password=DEV_PASSWORD)
    _warm_up(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        sampler = RSSSampler(gp.proc.pid)
        sampler.start()
        frozen_peak: list[int] = []

        def freeze() -> None:
            os.kill(backend, signal.SIGSTOP)
            time.sleep(4.0)
            frozen_peak.append(_rss(gp.proc.pid) - sampler.baseline)
            os.kill(backend, signal.SIGCONT)

        started = time.monotonic()
        thaw = None
        with conn.cursor().copy("copy sink from stdin where x = 'last'") as cp:
            for i in range(GIB // len(BLOCK)):
                if i == 256:  # a quarter in: the backend stops reading
                    thaw = threading.Thread(target=freeze)
                    thaw.start()
                cp.write(BLOCK)
            cp.write(b"last\n")
        seconds = time.monotonic() - started
        growth = sampler.stop()
        thaw.join()
        assert conn.execute("select count(*) from sink").fetchone()[0] == 1  # the end arrived
    print(f"COPY FROM STDIN 1 GiB in {seconds:.1f}s, backend frozen 4 s: gateway RSS "
          f"{sampler.baseline >> 20} MB, peak growth {growth / (1 << 20):.1f} MB "
          f"({sampler.samples} samples), while frozen {frozen_peak[0] / (1 << 20):.1f} MB")
    assert seconds > 4.0  # the client really was held back while the backend was frozen
    assert growth < MAX_GROWTH


@pytest.mark.slow
def test_copy_out_to_a_slow_reader_keeps_gateway_memory_flat(serve, tls):  # noqa: F811
    gp = serve(log_level="INFO")
    dsn = conninfo(gp.port, tls["ca"], "app1", password=DEV_PASSWORD)
    _warm_up(dsn)
    rows = GIB // len(ROW)
    with psycopg.connect(dsn, autocommit=True) as conn:
        sampler = RSSSampler(gp.proc.pid)
        sampler.start()
        started = time.monotonic()
        received, pauses = 0, [16 << 20, GIB // 2]  # stop reading for 3 s at these offsets
        with conn.cursor().copy(f"copy (select repeat('x', 8191) from generate_series(1, {rows})) "
                                "to stdout") as cp:
            for data in cp:
                received += len(data)
                if pauses and received >= pauses[0]:
                    pauses.pop(0)
                    time.sleep(3.0)
        seconds = time.monotonic() - started
        growth = sampler.stop()
    assert received == rows * len(ROW)
    print(f"COPY TO STDOUT 1 GiB in {seconds:.1f}s, reader paused 2 x 3 s: gateway RSS "
          f"{sampler.baseline >> 20} MB, peak growth {growth / (1 << 20):.1f} MB ({sampler.samples} samples)")
    assert growth < MAX_GROWTH


"""`python -m bench.profile <new|stopped|datapath> [--count N]`: run one gateway in this process
(its own thread and uvloop, as the tests do) with pyinstrument sampling the event-loop thread,
drive it with real clients, and print where the loop's time goes (wall clock, so time spent
waiting on a thread or a subprocess shows up as the await that waits for it)."""

from __future__ import annotations

import cProfile
import pstats
import shutil
import subprocess
import sys
import time

import click
from pyinstrument import Profiler

from gateway.config import Settings
from tests.support.harness import GatewayThread

from .coldstart import first_result_ms
from .env import DOMAIN, PASSWORD, Workdir, libpq_env, pgbench_init


def _gateway(work: Workdir, **extra) -> GatewayThread:
    root = work.path / "prof"
    root.mkdir(mode=0o711, exist_ok=True)
    root.chmod(0o711)
    settings = Settings(listen_host="127.0.0.1", listen_port=0, domains=[DOMAIN],
                        tls_cert=str(work.certs.cert), tls_key=str(work.certs.key),
                        data_root=str(root / "data"), storage_path=str(root / "storage"),
                        socket_dir=f"/tmp/pgsni-prof-{root.parent.name[-6:]}", create_on_connect=True,
                        dev_password=PASSWORD, wake_rate=0.0, log_level="WARNING", **extra)
    return GatewayThread(settings).start()


@click.command()
@click.argument("case", type=click.Choice(["new", "stopped", "datapath", "connect"]))
@click.option("--count", default=5, show_default=True)
@click.option("--html", default=None, help="Also write pyinstrument's HTML report here.")
@click.option("--cpu", is_flag=True, help="cProfile with the loop thread's CPU time instead (a busy "
              "machine makes wall-clock samples land wherever the thread was descheduled).")
def main(case: str, count: int, html: str | None, cpu: bool) -> None:
    work = Workdir()
    gt = _gateway(work, idle_timeout=3600)
    try:
        ids = [f"p{i}" for i in range(count)]
        if case == "stopped":
            for db in ids:
                first_result_ms(gt.port, db)
                gt.call(lambda db=db: gt.gw.instances.stop(db))
        elif case == "datapath":
            pgbench_init(gt.port, 1)
        elif case == "connect":
            first_result_ms(gt.port, "bench")
            (work.path / "select1.sql").write_text("SELECT 1;\n")
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        cprof = cProfile.Profile(time.thread_time)

        async def start():
            cprof.enable() if cpu else profiler.start()

        async def stop():
            cprof.disable() if cpu else profiler.stop()

        gt.call(start)
        t0 = time.perf_counter()
        if case in ("datapath", "connect"):
            extra = ["-C", "-f", str(work.path / "select1.sql")] if case == "connect" else ["-S"]
            subprocess.run(["pgbench", "-n", "-T", str(count), "-c", "1", "-j", "1", *extra],
                           env=libpq_env(gt.port), check=True, capture_output=True)
        else:
            for db in ids:
                print(f"{db}: {first_result_ms(gt.port, db):.0f} ms", file=sys.stderr)
        elapsed = time.perf_counter() - t0
        gt.call(stop)
        print(f"{case}: {elapsed:.2f} s", file=sys.stderr)
        if cpu:
            pstats.Stats(cprof).sort_stats("tottime").print_stats(25)
            pstats.Stats(cprof).sort_stats("cumulative").print_stats(30)
            return
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        if html:
            with open(html, "w") as f:
                f.write(profiler.output_html())
    finally:
        gt.stop()
        work.close()
        shutil.rmtree(gt.settings.socket_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

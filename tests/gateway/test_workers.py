"""The workers of one machine (gateway/workers.py, gateway/proxy/local_links.py) without
Postgres: what each worker is given, what settings refuse, and the local channel's two
requests on real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings
from gateway.proxy.cancel import CancelTable
from gateway.proxy.links import LinkUnreachable
from gateway.proxy.local_links import LocalChannel, local_address, send, socket_path
from gateway.wire import link as wire
from gateway.wire import protocol as p
from gateway.workers import Supervisor, WorkerSlot, channel_dir, worker_settings


def test_each_worker_gets_its_own_root_name_and_share():
    s = Settings(data_root="/srv/pgsni", workers=4, max_instances=50, cache_budget_mb=1000,
                 gateway_id="gw-ams-1", admin_port=8080, listen_port=5432)
    first, third = worker_settings(s, 0, 4), worker_settings(s, 2, 4)
    assert (first.data_root, first.gateway_id, first.admin_port) == ("/srv/pgsni", "gw-ams-1", 8080)
    assert (third.data_root, third.gateway_id, third.admin_port) == ("/srv/pgsni/.worker-2", "gw-ams-1-2", 0)
    assert first.socket_path != third.socket_path
    assert all(w.workers == 1 and w.max_instances == 12 and w.cache_budget_mb == 250 for w in (first, third))
    assert (first.listen_host, first.listen_port) == (third.listen_host, third.listen_port)
    assert channel_dir(s, "t") not in (first.socket_path, third.socket_path)


def test_each_supervisor_names_its_workers_channels_its_own_way():
    """Two machines (containers) with the same host name and data root must not take each
    other's workers for their own (peers.py compares the channel directory)."""
    s = Settings(data_root="/srv/pgsni", workers=2, listen_port=5432, lease_seconds=10)
    run = lambda settings, slot: None  # noqa: E731
    assert Supervisor(s, run).channel_dir != Supervisor(s, run).channel_dir


def test_instance_uids_of_workers_do_not_overlap():
    s = Settings(workers=2, instance_uid_base=100000, instance_uid_count=1000)
    ranges = [range(w.instance_uid_base, w.instance_uid_base + w.instance_uid_count)
              for w in (worker_settings(s, i, 2) for i in range(2))]
    assert ranges == [range(100000, 100500), range(100500, 101000)]


def test_a_small_cache_budget_is_split_into_budgets_not_into_none():
    """0 means no budget: a budget smaller than the number of workers must not become that."""
    s = Settings(workers=4, cache_budget_mb=3, listen_port=5432)
    assert [worker_settings(s, i, 4).cache_budget_mb for i in range(4)] == [1, 1, 1, 1]


@pytest.mark.parametrize("changes, says", [
    ({"lease_seconds": 0}, "lease_seconds"),
    ({"listen_port": 0}, "listen_port"),
    ({"workers": -1}, "workers must be"),
    # fewer uids than workers: each worker would get the same one, and two tenants on two
    # workers would run as one OS user
    ({"workers": 3, "instance_uid_base": 100000, "instance_uid_count": 2}, "instance_uid_count"),
])
def test_settings_workers_cannot_do_without(changes, says):
    with pytest.raises(ConfigError, match=says):
        Settings(**{"workers": 2, **changes})


LINKS = dict(advertise_address="[fdaa::5]:7000", cluster_listen="[::]:7000", cluster_ca="ca.pem",
             cluster_cert="gw.pem", cluster_key="gw-key.pem")


def test_each_worker_with_links_gets_its_own_internal_port():
    """Worker i of a machine with links listens for (and is reached by) the other machines'
    gateways on port + i of cluster_listen and advertise_address."""
    s = Settings(workers=3, listen_port=5432, **LINKS)
    got = [(w.cluster_listen, w.advertise_address) for w in (worker_settings(s, i, 3) for i in range(3))]
    assert got == [("[::]:7000", "[fdaa::5]:7000"), ("[::]:7001", "[fdaa::5]:7001"),
                   ("[::]:7002", "[fdaa::5]:7002")]
    assert all(worker_settings(s, i, 3).cluster_cert == "gw.pem" for i in range(3))
    assert worker_settings(Settings(workers=2), 1, 2).advertise_address == ""  # no links: none


def test_one_worker_needs_none_of_it():
    assert Settings(workers=1, lease_seconds=0, listen_port=0).worker_count == 1
    assert Settings(workers=0).worker_count == len(os.sched_getaffinity(0))


def test_an_address_names_a_socket_on_this_machine_only(tmp_path):
    path = tmp_path / "1.sock"
    assert socket_path(local_address(path)) == path
    for other in ("10.0.0.1:5433", f"local:not-{socket.gethostname()}:{path}", "local:"):
        with pytest.raises(LinkUnreachable):
            socket_path(other)


@pytest.fixture
def short_dir():
    slot = WorkerSlot(0, 2, Path(f"/tmp/pgsni-test-w{os.getpid()}"))
    slot.channel_dir.mkdir(mode=0o700, exist_ok=True)
    yield slot
    for f in slot.channel_dir.iterdir():
        f.unlink()
    slot.channel_dir.rmdir()


async def test_a_passed_socket_is_the_clients_own(short_dir):
    taken: asyncio.Queue = asyncio.Queue()
    counted = []
    channel = LocalChannel(short_dir.channel(1), lambda sock, peer, direct: taken.put_nowait((sock, peer, direct)),
                           CancelTable(), lambda kind, result: counted.append((kind, result)))
    await channel.open()
    try:
        assert os.stat(short_dir.channel(1)).st_mode & 0o777 == 0o600
        client, ours = socket.socketpair()
        with client:
            await send(local_address(short_dir.channel(1)),
                       wire.forward_request(wire.Forwarded("192.0.2.7:5000", True)), (ours.fileno(),))
            ours.close()  # the sender forgets it: the connection lives on in the receiver
            sock, peer, direct = await asyncio.wait_for(taken.get(), 5)
            with sock:
                assert (peer, direct) == ("192.0.2.7:5000", True)
                client.sendall(b"hello")
                assert sock.recv(5) == b"hello"
        assert counted == [("forward", "done")]
    finally:
        await channel.close()
    assert not short_dir.channel(1).exists()
    with pytest.raises(LinkUnreachable):  # nobody there: the client is served where it arrived
        await send(local_address(short_dir.channel(1)), wire.cancel_request(p.CancelRequest(1, b"abcd")))


async def test_malformed_requests_are_refused_and_their_sockets_closed(short_dir):
    counted = []
    async def not_served(*args):
        pytest.fail("served")

    channel = LocalChannel(short_dir.channel(1), lambda *a: pytest.fail("taken"), CancelTable(),
                           lambda kind, result: counted.append((kind, result)), not_served)
    await channel.open()
    try:
        address = local_address(short_dir.channel(1))
        a, b = socket.socketpair()
        with a, b:
            # a cancel with a socket, a forward and a session without one, bytes that are no request
            await send(address, wire.cancel_request(p.CancelRequest(1, b"abcd")), (b.fileno(),))
            await send(address, wire.forward_request(wire.Forwarded("192.0.2.7:5000", False)))
            await send(address, wire.session_request(wire.HandedSession("192.0.2.7:5000", "TLSv1.3", "x", "")))
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
                raw.sendto(b"\x00\x00\x00\x05junk", str(short_dir.channel(1)))
            b.close()
            for _ in range(100):
                if len(counted) == 4:
                    break
                await asyncio.sleep(0.02)
            assert counted == [("cancel", "refused"), ("forward", "refused"), ("session", "refused"),
                               ("invalid", "refused")]
            a.settimeout(5)
            assert a.recv(1) == b""  # the receiver closed the socket it was given
    finally:
        await channel.close()


async def test_a_passed_descriptor_that_is_no_socket_is_refused_and_closed(short_dir):
    """A forward request carrying a pipe (or any file) instead of a client's socket: refused
    like any malformed request, and the descriptor closed, not kept open for good."""
    counted = []
    channel = LocalChannel(short_dir.channel(1), lambda *a: pytest.fail("taken"), CancelTable(),
                           lambda kind, result: counted.append((kind, result)))
    await channel.open()
    try:
        read_end, write_end = os.pipe()
        try:
            await send(local_address(short_dir.channel(1)),
                       wire.forward_request(wire.Forwarded("192.0.2.7:5000", True)), (read_end,))
            os.close(read_end)
            read_end = -1
            for _ in range(100):
                if counted:
                    break
                await asyncio.sleep(0.02)
            assert counted == [("forward", "refused")]
            with pytest.raises(BrokenPipeError):  # no reader left anywhere
                os.write(write_end, b"x")
        finally:
            os.close(write_end)
            if read_end >= 0:
                os.close(read_end)
    finally:
        await channel.close()


def test_worker_0_serves_every_workers_metrics_labelled(short_dir):
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import Metrics

    first, second = Metrics(), Metrics()
    first.forwarded("out")
    second.forwarded("in")
    second.forwarded("in")
    WorkerSlot(1, 2, short_dir.channel_dir).publish_metrics(second.text())
    first.workers = short_dir.others_metrics
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        body, _ = first.render(accept)
        text = body.decode()
        assert text.count("# TYPE pgsni_forwarded_clients") == 1  # one family, not one per worker
        if accept:
            continue
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("pgsni_forwarded_clients_total", (("direction", "out"), ("worker", "0")))] == 1
        assert samples[("pgsni_forwarded_clients_total", (("direction", "in"), ("worker", "1")))] == 2
        assert ("process_cpu_seconds_total", (("worker", "1"),)) in samples
    old = time.time() - 60  # a worker that stopped publishing is left out
    os.utime(short_dir.channel_dir / "1.prom", (old, old))
    assert 'worker="1"' not in first.render()[0].decode()


def _supervise(monkeypatch, run_worker, until) -> Supervisor:
    """Run a Supervisor of two workers (forked processes running `run_worker`) in this
    process until `until(supervisor)` holds, then SIGTERM it as an operator would."""
    import signal
    import threading

    from gateway import workers

    monkeypatch.setattr(workers, "YOUNG", 1.0)
    monkeypatch.setattr(workers, "RESTART_PAUSE", 0.1)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    sup = Supervisor(Settings(workers=2, data_root=f"/tmp/pgsni-test-sup{os.getpid()}"), run_worker)

    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 20
        while not until(sup) and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not done.is_set():  # the supervisor's handler is still in place until we are joined
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sup.code = sup.run()
    finally:
        done.set()
        watcher.join(5)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(sup.settings.data_root, ignore_errors=True)
    return sup


def test_a_worker_that_fails_after_its_start_is_restarted(monkeypatch, tmp_path):
    def run_worker(settings, slot):
        if slot.index == 1 and not (tmp_path / "failed").exists():
            time.sleep(1.5)  # up for a while, then a crash (exit code 1)
            (tmp_path / "failed").touch()
            raise RuntimeError("boom")
        time.sleep(60)  # until the supervisor's SIGTERM

    sup = _supervise(monkeypatch, run_worker, lambda s: s.spawned.get(1) == 2)
    assert (sup.code, sup.restarts, sup.spawned) == (0, 1, {0: 1, 1: 2})
    assert not sup.channel_dir.exists()


def test_a_worker_whose_first_start_fails_stops_them_all(monkeypatch):
    def run_worker(settings, slot):
        if slot.index == 1:
            raise OSError("cannot listen")  # as a configuration error would
        time.sleep(60)

    sup = _supervise(monkeypatch, run_worker, lambda s: s.stopping)
    assert (sup.code, sup.restarts, sup.spawned) == (1, 0, {0: 1, 1: 1})


def test_a_signal_right_after_a_fork_stops_the_new_worker_too(monkeypatch, tmp_path):
    """SIGTERM between a worker's fork and the supervisor's note of it: the handler, run at
    once, stopped the workers it knew, not the new one, and the supervisor waited for that one
    for as long as it ran."""
    import signal
    import threading

    from gateway import workers

    real_fork, forks = os.fork, []

    def fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
            if len(forks) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # before the supervisor recorded it
        return pid
    monkeypatch.setattr(workers.os, "fork", fork)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    sup = Supervisor(Settings(workers=2, data_root=str(tmp_path / "root")), lambda settings, slot: time.sleep(20))
    done = threading.Event()

    def watchdog() -> None:  # never leave workers behind, whatever happens
        if not done.wait(10):
            for pid in forks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    threading.Thread(target=watchdog, daemon=True).start()
    began = time.monotonic()
    try:
        sup.run()
    finally:
        done.set()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert time.monotonic() - began < 5, "the supervisor waited for a worker it never stopped"

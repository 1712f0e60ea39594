"""tests/support/ports.py: ports for the servers tests start never come from the range the
kernel hands out by itself, never repeat within a test process, differ between pytest-xdist
workers, and skip one somebody listens on. (A port picked by binding port 0 could be taken by
anyone before its server bound it: a gateway of the forwarding benchmark's test once failed to
listen while a stranger answered its clients.)"""

from __future__ import annotations

import socket

from tests.support import ports


def test_ports_are_below_the_ephemeral_range_and_never_repeat():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    got = [ports.free_port() for _ in range(200)]
    assert len(set(got)) == len(got)
    assert all(ports.LOWEST <= p < ephemeral_low for p in got)


def test_xdist_workers_have_bands_of_their_own(monkeypatch):
    bands = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        bands.append(set(ports._band()))
    assert all(bands) and not (bands[0] & bands[1] or bands[1] & bands[2] or bands[0] & bands[2])


def test_a_port_somebody_listens_on_is_skipped(monkeypatch):
    band = ports._band()
    port = next(p for p in band if ports._bindable("127.0.0.1", p) and ports._bindable("127.0.0.1", p + 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        monkeypatch.setattr(ports, "_next", port - band.start)
        assert ports.free_port() == port + 1
        monkeypatch.setattr(ports, "_next", port - band.start - 1)
        first = ports.free_ports(2)
        assert port not in (first, first + 1)

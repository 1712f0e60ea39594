"""Ports for the servers that tests and benchmarks start on 127.0.0.1.

A port the kernel picks (bind to port 0, then close) is free only until someone binds it,
and the kernel hands the same ports to every process: another test process asking at the
same moment, or any outgoing connection, can take it before the server it was meant for
starts. That server then fails to listen while a stranger answers on its port, and the test
fails far from the cause (a client's connection "closed unexpectedly"). So ports come from
below the kernel's ephemeral range, which it never gives out by itself, each pytest-xdist
worker from a band of its own, one after another, each checked free when handed out."""

from __future__ import annotations

import os
import random
import socket
import threading

LOWEST = 10000
_lock = threading.Lock()
_next: int | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on, not handed out before by this process."""
    return free_ports(1, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive such ports."""
    global _next
    band = _band()
    with _lock:
        if _next is None:
            _next = random.randrange(len(band))
        for _ in range(len(band)):
            first = band.start + _next % len(band)
            _next += count
            if first + count <= band.stop and all(_bindable(host, p) for p in range(first, first + count)):
                return first
    raise RuntimeError(f"no {count} free consecutive ports in {band.start}-{band.stop - 1}")


def _band() -> range:
    """This process's ports: its pytest-xdist worker's share of those below the ephemeral
    range (all of them outside pytest-xdist)."""
    top = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            top = min(top, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = max(1, (top - LOWEST) // max(1, workers))
    start = LOWEST + (worker % max(1, workers)) * size
    return range(start, start + size)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True

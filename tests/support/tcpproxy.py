"""A loopback TCP proxy that tests can cut and restore, to make a server look down (connections
refused, open ones reset) without losing the server's state, or slow it down (`delay`); with
several targets, a load balancer: each connection goes to the next target that accepts it
(round robin, skipping targets that refuse, as a load balancer retries another machine)."""

from __future__ import annotations

import queue
import socket
import threading
import time


class TCPProxy:
    """`source`: connect to the target from this local address (e.g. 127.0.0.2), so the
    target sees a second client IP."""

    def __init__(self, target_port: int | list[int], source: str | None = None, record: bool = False) -> None:
        """`record`: keep what clients send (`recorded`, in order of arrival)."""
        ports = target_port if isinstance(target_port, list) else [target_port]
        self.targets = [("127.0.0.1", port) for port in ports]
        self._turn = 0
        self.refused = 0  # connections no target accepted
        self.source = (source, 0) if source else None
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._listener.listen(128)
        self._up = threading.Event()
        self._up.set()
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.delay = 0.0  # seconds added before each chunk is forwarded, either way (latency)
        self.recorded: list[bytes] | None = [] if record else None
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """From now on, new connections are closed at once and open ones are reset."""
        self._up.clear()
        with self._lock:
            for s in list(self._conns):
                _reset(s)
            self._conns.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closing = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _reset(client)
                continue
            upstream = self._connect()
            if upstream is None:
                self.refused += 1
                _reset(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b, record in ((client, upstream, self.recorded), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, record), daemon=True).start()

    @property
    def target(self) -> tuple[str, int]:
        return self.targets[0]

    @target.setter
    def target(self, address: tuple[str, int]) -> None:
        self.targets = [address]

    def _connect(self) -> socket.socket | None:
        """A connection to the next target that accepts one."""
        targets = list(self.targets)
        self._turn += 1
        for i in range(len(targets)):
            try:
                upstream = socket.create_connection(targets[(self._turn + i) % len(targets)], timeout=5,
                                                    source_address=self.source)
            except OSError:
                continue
            upstream.settimeout(None)
            return upstream
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, record: list[bytes] | None) -> None:
        # a sender thread delivers each chunk `delay` seconds after it arrived: latency
        # without a throughput limit, as on a long link
        chunks: queue.Queue = queue.Queue()
        sender = threading.Thread(target=self._deliver, args=(chunks, src, dst), daemon=True)
        sender.start()
        try:
            while True:
                data = src.recv(65536)
                if not data or not self._up.is_set():
                    break
                chunks.put((time.monotonic() + self.delay, data))
                if record is not None:
                    record.append(data)
        except OSError:
            pass
        finally:
            chunks.put(None)
            sender.join(60)
            _shutdown(src, dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def _deliver(self, chunks: queue.Queue, src: socket.socket, dst: socket.socket) -> None:
        try:
            while (item := chunks.get()) is not None:
                due, data = item
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                if not self._up.is_set():
                    break
                dst.sendall(data)
            return
        except (OSError, ValueError):
            pass
        _shutdown(src, dst)  # the reader is blocked on src: wake it


def _shutdown(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass

"""gateway/proxy/cancel.py: keys carry the backend's real pid and a secret of the gateway's; two
backends with one pid (a local one and a remote route's) stay apart by their secrets."""

from __future__ import annotations

from gateway.wire import protocol as p
from gateway.proxy.cancel import LONG_KEY_VERSION, CancelTable, CancelTarget, gateway_of


async def _forward(key: p.BackendKeyData, timeout: float) -> None:
    pass


def target(pid: int) -> CancelTarget:
    return CancelTarget(p.BackendKeyData(pid, b"back"), _forward)


def test_keys_are_the_real_pid_with_a_secret_of_ours():
    table = CancelTable()
    short, long = table.issue(target(4242)), table.issue(target(4243), long=True)
    assert (short.pid, len(short.secret)) == (4242, 4) and short.secret != b"back"
    assert (long.pid, len(long.secret)) == (4243, 32)
    assert long.secret[0] == LONG_KEY_VERSION and long.secret[1:3] == b"\0\0"  # gateway number 0


def test_one_pid_two_backends_are_told_apart_by_the_secret():
    table = CancelTable()
    local, remote = target(100), target(100)
    k1, k2 = table.issue(local), table.issue(remote)
    assert table.lookup(p.CancelRequest(100, k1.secret)) is local
    assert table.lookup(p.CancelRequest(100, k2.secret)) is remote
    assert table.lookup(p.CancelRequest(100, bytes(4))) is None
    assert table.lookup(p.CancelRequest(101, k1.secret)) is None
    table.forget(k1)
    assert table.lookup(p.CancelRequest(100, k1.secret)) is None
    assert table.lookup(p.CancelRequest(100, k2.secret)) is remote and len(table) == 1
    table.forget(k2)
    assert len(table) == 0


async def test_only_unknown_keys_go_elsewhere_and_a_relayed_one_never_does():
    sent, relayed = [], []

    async def forward(key: p.BackendKeyData, timeout: float) -> None:
        sent.append(key)

    async def elsewhere(request: p.CancelRequest) -> str:
        relayed.append(request)
        return "relayed"

    table = CancelTable()
    table.gateway = 0x1234
    key = table.issue(CancelTarget(p.BackendKeyData(7, b"back"), forward), long=True)
    assert key.secret[1:3] == b"\x12\x34" and gateway_of(key.secret) == 0x1234
    assert gateway_of(bytes(4)) == 0
    unknown = p.CancelRequest(7, bytes(32))
    assert await table.cancel(unknown) == "unknown"  # no links: ignored, as before
    table.elsewhere = elsewhere
    assert await table.cancel(p.CancelRequest(7, key.secret)) == "forwarded" and relayed == []
    assert sent == [p.BackendKeyData(7, b"back")]
    assert await table.cancel(unknown) == "relayed" and relayed == [unknown]
    assert await table.cancel_here(unknown) is False and relayed == [unknown]  # from a peer: never further


async def test_a_cancel_over_a_socket_closes_it_also_when_the_server_does_not_answer(tmp_path):
    """The server reads the request and never closes: once the wait ends the gateway closes
    its end (before, only a server that closed first got it closed; else the socket stayed
    open until the garbage collector found it)."""
    import asyncio
    import gc

    from gateway.proxy.cancel import cancel_over_socket

    ended = asyncio.Event()

    async def never_answers(reader, writer):
        await reader.readexactly(16)  # the CancelRequest
        await reader.read()  # until the gateway closes its end
        ended.set()
        writer.close()

    path = tmp_path / ".s.PGSQL.5432"
    server = await asyncio.start_unix_server(never_answers, str(path))
    gc.disable()
    try:
        await cancel_over_socket(path, p.BackendKeyData(1, b"abcd"), timeout=0.2)
        await asyncio.wait_for(ended.wait(), 2.0)
    finally:
        gc.enable()
        server.close()

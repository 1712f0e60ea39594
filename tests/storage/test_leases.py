"""Per-database leases (storage/leases.py) on an in-memory store (tests/storage/fake_store.py)
that each gateway reaches through its own connection, with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from storage.errors import PreconditionFailed, StorageUnavailable
from storage.lease_marks import LeaseMarks
from storage.leases import LeaseHeld, Leases, check_timing

from .fake_store import FakeBackend, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> Store:
    return Store(clock)


def lease_holder(store, db_id: str) -> str | None:
    """Whom the lease of `db_id` names in the store now (None: free, or no lease)."""
    if f"dbs/{db_id}/lease.json" not in store.objects:
        return None
    return json.loads(store.objects[f"dbs/{db_id}/lease.json"][0]).get("holder")


def make(store, clock, holder: str, ttl: float = 60.0) -> Leases:
    """A gateway's leases, on its own connection to `store` (`.backend`, partitionable)."""
    return Leases(FakeBackend(store), holder, ttl, margin=10.0, clock=clock, monotonic=clock)


async def test_a_free_database_is_claimed_and_a_held_one_refused(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("db1")
    assert a.held == {"db1"}
    with pytest.raises(LeaseHeld) as e:
        await b.claim("db1")
    assert e.value.holder == "gw-a" and "another gateway (gw-a)" in str(e.value)
    await b.claim("db2")  # other databases are independent
    assert b.held == {"db2"}


async def test_release_lets_another_gateway_claim(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("db1")
    await a.release("db1")
    assert a.held == set()
    await b.claim("db1")
    assert lease_holder(store, "db1") == "gw-b"
    await a.release("db1")  # not held by a any more: must not free b's lease
    with pytest.raises(LeaseHeld):
        await a.claim("db1")


async def test_a_dead_holder_is_taken_over_only_after_heartbeat_and_margin(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("db1")
    clock.now += 60 + 5  # expired, but within the clock-skew margin
    with pytest.raises(LeaseHeld):
        await b.claim("db1")
    clock.now += 10
    await b.claim("db1")
    assert b.held == {"db1"}


async def test_a_live_holder_keeps_its_lease_by_renewing(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("db1")
    expired = []
    for _ in range(10):  # 200 s of renewals every 20 s
        clock.now += 20
        await a.keep_alive(lambda: expired.append(1) or _noop())
    assert not expired
    with pytest.raises(LeaseHeld):
        await b.claim("db1")


async def _noop() -> None:
    return None


async def test_holder_fences_itself_before_others_may_take_over(store, clock):
    a = make(store, clock, "gw-a")
    await a.claim("db1")
    a.backend.partition()
    fenced = []

    async def on_expired() -> None:
        fenced.append(clock.now)

    clock.now += 20
    await a.keep_alive(on_expired)
    assert not fenced  # one missed renewal is tolerated
    assert await _claim_without_storage(a, "db1")  # still ours: no storage needed
    clock.now += 30  # 50 s since the last heartbeat: past ttl - margin
    await a.keep_alive(on_expired)
    assert fenced, "the holder must stop its databases once its heartbeat may have expired"
    a.backend.heal()
    b = make(store, clock, "gw-b")
    with pytest.raises(LeaseHeld):
        await b.claim("db1")  # a fenced itself before its heartbeat expired for others
    clock.now += 25  # now 75 s: beyond ttl + margin
    await b.claim("db1")


async def _claim_without_storage(leases: Leases, db_id: str) -> bool:
    await leases.claim(db_id)
    return db_id in leases.held


async def test_a_damaged_lease_or_heartbeat_holds_nothing(store, clock):
    backend = FakeBackend(store)
    await backend.put("dbs/db1/lease.json", b"not json")
    b = make(store, clock, "gw-b")
    await b.claim("db1")
    await backend.put("dbs/db2/lease.json", json.dumps({"holder": "gw-x"}).encode())
    await backend.put("gateways/gw-x.json", b"{broken")
    await b.claim("db2")
    assert b.held == {"db1", "db2"}


async def test_zero_ttl_disables_leases(store, clock):
    a, b = make(store, clock, "gw-a", ttl=0), make(store, clock, "gw-b", ttl=0)
    await a.claim("db1")
    await b.claim("db1")
    assert "dbs/db1/lease.json" not in store.objects


async def test_a_clean_stop_gives_the_lease_up_at_once(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("x")
    a.release_later("x")
    await a.keep_alive(_noop)  # one round; no time passes
    assert a.held == set()
    assert await b.claim("x") is True


async def test_a_release_goes_in_the_background_and_is_retried_until_it_works(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("x")
    await a.claim("y")
    a.release_later("x")
    await asyncio.sleep(0.01)  # no keep_alive round: released in the background
    assert await b.claim("x") is True
    a.backend.partition()
    a.release_later("y")
    await asyncio.sleep(0.01)
    await a.keep_alive(_noop)
    a.backend.heal()
    with pytest.raises(LeaseHeld):
        await b.claim("y")  # its release failed: still a's
    clock.now += 20
    await a.keep_alive(_noop)
    assert await b.claim("y") is True


async def test_shutdown_releases_every_lease_let_go(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    for db_id in ("x", "y"):
        await a.claim(db_id)
        a.release_later(db_id)
    await a.release_idle()  # what InstanceManager.stop_all awaits
    assert await b.claim("x") is True and await b.claim("y") is True


async def test_a_lapsed_holder_does_not_answer_from_memory_after_the_partition_heals(store, clock):
    """Holdings end with the heartbeat: a renewal after the lapse does not bring them back,
    so the gateway asks storage again and learns that another one took over meanwhile."""
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("x")
    a.backend.partition()
    clock.now += 60 + 10 + 5  # a's heartbeat is dead for everyone
    assert await b.claim("x") is True  # b takes x over
    a.backend.heal()
    await a.beat()  # a's heartbeat is renewed: valid() again
    with pytest.raises(LeaseHeld) as e:
        await a.claim("x")  # not "still ours" from memory
    assert e.value.holder == "gw-b" and "x" not in a.held


async def test_a_lapse_a_claim_notices_is_still_fenced_and_then_released(store, clock):
    a = make(store, clock, "gw-a")
    await a.claim("x")
    clock.now += 55  # past ttl - margin without a renewal: x's holding lapsed
    assert await a.claim("y") is True  # storage answers: y is taken on a fresh heartbeat
    assert a.held == {"y"} and a.fencing_needed()
    fenced = []
    await a.keep_alive(lambda: fenced.append(1) or _noop())
    assert fenced and not a.fencing_needed()
    assert lease_holder(store, "x") is None  # given up once its instance stopped


async def test_a_hanging_heartbeat_write_does_not_hold_up_fencing(store, clock):
    """Every heartbeat write is bounded (by margin / 2), so a store that hangs (rather than
    failing fast after its retries) cannot keep the holder from fencing in time."""
    a = Leases(FakeBackend(store), "gw-a", 6.0, margin=1.0, clock=clock, monotonic=clock)
    await a.claim("x")
    a.backend.partition(hang=True)
    fenced = []
    clock.now += 3  # a renewal is due; it hangs
    await asyncio.wait_for(a.keep_alive(lambda: fenced.append(1) or _noop()), 2)
    assert not fenced and a.held == {"x"}
    clock.now += 2.5  # past ttl - margin
    assert a.fencing_needed()  # answered at once, without storage
    await asyncio.wait_for(a.keep_alive(lambda: fenced.append(1) or _noop()), 2)
    assert fenced and a.held == set()


async def test_takeover_is_judged_by_the_stores_clock_not_a_skewed_local_one(store, clock):
    """b's clock runs five minutes ahead: by it, a's heartbeat looks long expired. The store's
    own clock (when it took a's heartbeat, and b's fresh one) says a is alive."""
    a = make(store, clock, "gw-a")
    b_clock = Clock()
    b_clock.now = clock.now + 300
    b = make(store, b_clock, "gw-b")
    await a.claim("x")
    clock.now += 30
    b_clock.now += 30
    with pytest.raises(LeaseHeld):
        await b.claim("x")
    clock.now += 45  # a wrote its heartbeat 75 s ago by the store's clock: dead
    b_clock.now += 45
    assert await b.claim("x") is True


class LosesLeaseAnswers(FakeBackend):
    """The store takes every lease write, but while `losing` its answer never arrives (the
    backend gives up: StorageUnavailable)."""
    losing = False

    async def put(self, key, data, **kwargs):
        etag = await super().put(key, data, **kwargs)
        if self.losing and key.endswith("/lease.json"):
            raise StorageUnavailable("no answer (test)")
        return etag


async def test_a_claim_whose_answer_was_lost_gives_the_lease_up_later(store, clock):
    """The store took the claim's write but the claim failed: the lease names this gateway,
    whose heartbeat goes on for its other databases. Unless given up, nobody else could ever
    have that database (found by the lease simulation: test_lease_simulation.py)."""
    a = Leases(LosesLeaseAnswers(store), "gw-a", 60.0, margin=10.0, clock=clock, monotonic=clock)
    b = make(store, clock, "gw-b")
    await a.claim("x")
    a.backend.losing = True
    with pytest.raises(StorageUnavailable):
        await a.claim("y")
    a.backend.losing = False
    with pytest.raises(LeaseHeld):
        await b.claim("y")  # the store took a's write
    clock.now += 20
    await a.keep_alive(_noop)
    assert a.held == {"x"} and await b.claim("y") is True


class TakesLeaseWritesLate(FakeBackend):
    """While `late`, a write or delete of a lease gets no answer in time (StorageUnavailable),
    and the store takes it a moment later: it was on its way when the caller gave up. A
    conditional write is judged when it is taken."""

    late = False

    async def put(self, key, data, **kwargs):
        if not (self.late and key.endswith("/lease.json")):
            return await super().put(key, data, **kwargs)

        async def taken_later() -> None:
            await asyncio.sleep(0.05)
            with contextlib.suppress(PreconditionFailed):
                await FakeBackend.put(self, key, data, **kwargs)
        self.landing = asyncio.ensure_future(taken_later())
        raise StorageUnavailable("no answer in time (test)")

    async def delete(self, keys):
        if not self.late:
            return await super().delete(keys)
        asyncio.get_running_loop().call_later(0.05, lambda: [self.store.objects.pop(k, None) for k in keys])
        raise StorageUnavailable("no answer in time (test)")


async def test_a_release_taken_late_does_not_free_a_lease_claimed_again(store, clock):
    """Found by the lease simulation (late_writes, seed 214): the release's write reaches the
    store after the gateway claimed the database again; it must not free that new claim."""
    a = Leases(TakesLeaseWritesLate(store), "gw-a", 60.0, margin=10.0, clock=clock, monotonic=clock)
    b = make(store, clock, "gw-b")
    await a.claim("x")
    a.backend.late = True
    await a.release("x")  # no answer: retried later, but the store takes it in a moment
    a.backend.late = False
    assert await a.claim("x") is True  # the lease still names gw-a: a holds x again
    await asyncio.sleep(0.1)
    assert lease_holder(store, "x") == "gw-a"
    with pytest.raises(LeaseHeld):
        await b.claim("x")


async def test_a_restart_gives_up_the_leases_a_crash_left(store, clock, tmp_path):
    """Found by the lease simulation (seed 295): a gateway that crashed between a claim and its
    release left a lease naming it, which its restart, heartbeating for other databases, kept
    for ever. The claim marks it on local disk first; the restart gives it up."""
    marks = tmp_path / ".leases"  # in the data root

    def run() -> Leases:
        return Leases(FakeBackend(store), "gw-a", 60.0, margin=10.0, clock=clock, monotonic=clock,
                      marks=LeaseMarks(marks))

    a, b = run(), make(store, clock, "gw-b")
    await a.claim("x")
    await a.claim("y")
    await a.release("y")  # given up: no mark left
    assert sorted(p.name for p in marks.iterdir()) == ["x"]
    a = run()  # a crashed (x still named it) and restarted
    assert a.left_by_earlier_run() == {"x"}
    await a.claim("z")  # it heartbeats for another database
    a.give_up_later("x")  # InstanceManager.recover: x's copy has nothing to save
    await a.keep_alive(_noop)
    assert await b.claim("x") is True
    assert a.left_by_earlier_run() == {"z"}
    with pytest.raises(LeaseHeld):
        await a.claim("x")  # another's now: its mark goes too
    assert a.left_by_earlier_run() == {"z"}


def test_leases_must_outlast_a_storage_request_with_all_its_retries():
    check_timing(60, 10, 41.4)  # the defaults on S3: 4 attempts of 10 s plus backoff
    check_timing(3, 0.5, 0)  # a local directory retries nothing
    with pytest.raises(ValueError, match=r"lease_seconds = 30 is too short.*41\.4 s"):
        check_timing(30, 5, 41.4)


async def test_a_draining_holder_is_told_apart_and_waited_for_until_it_lets_go(store, clock):
    a, b = make(store, clock, "gw-a"), make(store, clock, "gw-b")
    await a.claim("db1")
    assert not await b.drained("db1")  # a live holder that does not drain: nothing to wait for
    with pytest.raises(LeaseHeld) as e:
        await b.claim("db1")
    assert not e.value.draining
    a.advertise = lambda: ("10.0.0.1:7000", {"running": 1, "draining": 1})
    await a.beat()
    with pytest.raises(LeaseHeld) as e:
        await b.claim("db1")
    assert e.value.draining and "shutting down" in str(e.value)
    waiting = [asyncio.ensure_future(b.drained("db1", poll=0.01)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting)
    await a.release("db1")
    assert await asyncio.gather(*waiting) == [True, True, True]
    assert await b.claim("db1")
    assert not await b.drained("db1")  # held by the asking gateway itself


async def test_the_heartbeat_is_renewed_while_a_fence_waits(store, clock):
    """The fence waits for what must end first (a save in progress: an upload, bounded only by
    the storage's timeouts). keep_alive awaited it, so no heartbeat was renewed meanwhile and a
    database claimed after the lapse lapsed in turn. Now the fence runs once in the
    background, the rounds go on renewing, and the lapsed lease is given up after it."""
    a = Leases(FakeBackend(store), "gw-a", 3.0, margin=0.5, clock=clock, monotonic=clock)
    await a.claim("x")
    clock.now += 2.6  # past ttl - margin without a renewal: x lapsed
    ends, fences = asyncio.Event(), []

    async def slow_fence() -> None:
        fences.append(clock.now)
        await ends.wait()
    await asyncio.wait_for(a.keep_alive(slow_fence), 3)
    assert fences and a.fencing_needed()  # still fencing
    assert lease_holder(store, "x") == "gw-a"  # not given up before the fence returns
    await a.claim("y")  # claimed while the fence runs
    for _ in range(4):  # 4 s of rounds; y's heartbeat would lapse after 2.5 s
        clock.now += 1.0
        await asyncio.wait_for(a.keep_alive(slow_fence), 3)
    assert a.holds("y") and len(fences) == 1  # renewed; one fence, not one per round
    ends.set()
    await asyncio.wait_for(a.keep_alive(slow_fence), 3)
    assert not a.fencing_needed() and lease_holder(store, "x") is None and a.holds("y")

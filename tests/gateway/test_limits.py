"""Unit tests of gateway/proxy/limits.py with a fake clock: no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.config import Settings
from gateway.proxy.limits import ConnectionCounter, Limits, SlidingWindow
from gateway.rates import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- connection counters ---------------------------------------------------------------------
def test_counter_caps_each_key_separately_and_frees_on_release():
    c = ConnectionCounter(2)
    assert c.try_acquire("a") and c.try_acquire("a")
    assert not c.try_acquire("a")
    assert c.try_acquire("b")
    c.release("a")
    assert c["a"] == 1
    assert c.try_acquire("a")


def test_counter_forgets_keys_without_connections():
    c = ConnectionCounter(5)
    for i in range(1000):
        assert c.try_acquire(f"10.0.0.{i}")
    for i in range(1000):
        c.release(f"10.0.0.{i}")
    assert c.counts == {}


def test_counter_limit_zero_counts_without_a_cap():
    c = ConnectionCounter(0)
    for _ in range(10_000):
        assert c.try_acquire()
    assert c[None] == 10_000


# --- token bucket ----------------------------------------------------------------------------
def test_bucket_allows_the_burst_then_spaces_reservations_by_the_rate():
    clock = FakeClock()
    b = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [b.reserve(10) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [b.reserve(10) for _ in range(3)] == pytest.approx([0.5, 1.0, 1.5])


def test_bucket_refuses_when_the_wait_exceeds_the_maximum_and_takes_nothing():
    clock = FakeClock()
    b = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert b.reserve(0) == 0.0
    assert b.reserve(0.5) is None
    assert b.reserve(0.5) is None  # the refusals did not queue up a debt
    clock.advance(0.6)
    assert b.reserve(0.5) == pytest.approx(0.4)


def test_bucket_refills_up_to_the_burst_only():
    clock = FakeClock()
    b = TokenBucket(rate=10.0, burst=2, clock=clock)
    b.reserve(0), b.reserve(0)
    clock.advance(3600)
    assert [b.reserve(0) for _ in range(2)] == [0.0, 0.0]
    assert b.reserve(0) is None


def test_bucket_rate_zero_is_unlimited():
    b = TokenBucket(rate=0, burst=1, clock=FakeClock())
    assert all(b.reserve(0) == 0.0 for _ in range(1000))


# --- sliding window --------------------------------------------------------------------------
def test_window_blocks_at_the_limit_and_unblocks_as_events_age_out():
    clock = FakeClock()
    w = SlidingWindow(3, window=60, clock=clock)
    for _ in range(2):
        w.record("ip")
        clock.advance(10)
    assert not w.blocked("ip")
    w.record("ip")  # 3 events at t=0, 10, 20
    assert w.blocked("ip")
    assert not w.blocked("other")
    clock.advance(40)  # t=60: the first event is a minute old
    assert not w.blocked("ip")
    w.record("ip")
    assert w.blocked("ip")


def test_window_limit_zero_never_blocks():
    w = SlidingWindow(0, clock=FakeClock())
    for _ in range(100):
        w.record("ip")
    assert not w.blocked("ip") and len(w) == 0


def test_window_keeps_at_most_limit_times_per_key():
    w = SlidingWindow(5, clock=FakeClock())
    for _ in range(10_000):
        w.record("ip")
    assert len(w.events["ip"]) == 5


def test_window_caps_tracked_keys_evicting_the_least_recently_recorded():
    clock = FakeClock()
    w = SlidingWindow(2, window=60, clock=clock, max_keys=100)
    w.record("old")
    w.record("old")
    for i in range(150):
        w.record(f"k{i}")
    assert len(w) == 100
    assert not w.blocked("old")  # forgotten
    assert "k149" in w.events and "k49" not in w.events and "k50" in w.events


def test_window_drops_expired_keys():
    clock = FakeClock()
    w = SlidingWindow(2, window=60, clock=clock)
    for i in range(500):
        w.record(f"k{i}")
    clock.advance(61)
    w.record("fresh")
    assert list(w.events) == ["fresh"]


# --- the aggregate ---------------------------------------------------------------------------
def test_limits_refuse_with_the_cap_named_and_count_nothing_on_refusal():
    lim = Limits(Settings(max_client_connections=3, max_connections_per_ip=2))
    assert lim.admit("1.2.3.4") is None and lim.admit("1.2.3.4") is None
    err = lim.admit("1.2.3.4")
    assert err.code == "53300" and err.message == "too many connections from 1.2.3.4 (limit 2)"
    assert lim.admit("5.6.7.8") is None
    err = lim.admit("9.9.9.9")
    assert err.code == "53300" and err.message == "the gateway is at its connection limit (3)"
    lim.leave("1.2.3.4")
    assert lim.total[None] == 2 and lim.per_ip["1.2.3.4"] == 1
    assert lim.admit("9.9.9.9") is None


def test_limits_per_db_and_auth_failures():
    clock = FakeClock()
    lim = Limits(Settings(max_connections_per_db=1, auth_failures_per_minute=2), clock=clock)
    lim.enter_db("app1")
    with pytest.raises(Exception, match='too many connections to database "app1" \\(limit 1\\)'):
        lim.enter_db("app1")
    lim.per_db.release("app1")
    lim.enter_db("app1")
    lim.auth_failed("1.1.1.1", "app1")
    lim.check_auth("1.1.1.1", "app1")
    lim.auth_failed("1.1.1.1", "app1")
    for ip, db in (("1.1.1.1", "app2"), ("2.2.2.2", "app1")):
        with pytest.raises(Exception, match="too many failed authentication attempts") as e:
            lim.check_auth(ip, db)
        assert e.value.code == "28000"
    lim.check_auth("2.2.2.2", "app2")
    clock.advance(60)
    lim.check_auth("1.1.1.1", "app1")


def test_settings_reject_negative_limits():
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match="wake_rate"):
        Settings(wake_rate=-1)
    with pytest.raises(ConfigError, match="wake_burst"):
        Settings(wake_burst=0)


def test_a_key_emptied_by_blocked_does_not_break_the_next_record():
    """The reported sequence: a failure for a, 61 s later a good login to a (blocked() expires
    a's only event), then a failure for b. It raised IndexError: the client got XX000."""
    clock = FakeClock()
    w = SlidingWindow(30, clock=clock)
    w.record("a")
    clock.now += 61
    assert not w.blocked("a")
    w.record("b")
    assert len(w) == 1 and not w.blocked("b")


class WindowModel(RuleBasedStateMachine):
    """Any sequence of record / blocked / time passing: never an exception, always the answer
    of a plain list of every event (while no key is evicted), memory within its bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.limit, self.window, self.max_keys = 3, 60.0, 4
        self.w = SlidingWindow(self.limit, self.window, clock=self.clock, max_keys=self.max_keys)
        self.history: dict[str, list[float]] = {}
        self.evicted = False

    keys = st.sampled_from(["a", "b", "c", "d", "e"])

    @rule(key=keys)
    def record(self, key):
        self.w.record(key)
        self.history.setdefault(key, []).append(self.clock.now)
        live = {k for k, t in self.history.items() if t and t[-1] > self.clock.now - self.window}
        self.evicted |= len(live) > self.max_keys

    @rule(key=keys)
    def blocked(self, key):
        got = self.w.blocked(key)
        if not self.evicted:
            recent = [t for t in self.history.get(key, []) if t > self.clock.now - self.window]
            assert got == (len(recent) >= self.limit)

    @rule(seconds=st.sampled_from([0.0, 0.5, 30.0, 59.9, 60.0, 61.0, 300.0]))
    def wait(self, seconds):
        self.clock.now += seconds

    @invariant()
    def bounded(self):
        assert len(self.w) <= self.max_keys
        assert all(len(t) <= self.limit for t in self.w.events.values())


TestWindowModel = WindowModel.TestCase
TestWindowModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)

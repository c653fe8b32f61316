"""The instrumentation hook (``guard.observe``) and ``guard.stats()``: every decision,
Redis call, error, breaker change, threshold and dropped event reaches the observer,
never an organization or a user; an observer that raises breaks no request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import redis

from conftest import RedisProcess
from usage_guard import InvalidUsage, Observer, Plan, Stats, UsageGuard, listeners
from usage_guard.decision import Scope
from usage_guard.observe import BreakerState
from usage_guard.runtime import PROBE_INTERVAL, node_name

PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 1000, "contacts": 100})}
MakeGuard = Callable[..., UsageGuard]


class Recorder(Observer):
    """Every event, as a tuple: ("decision", metric, scope, allowed), ..."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.seconds = 0.0
        self.durations: list[float] = []

    def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
        self.events.append(("decision", metric, scope, allowed))

    def redis_call(self, script: str, seconds: float, outcome: str) -> None:
        self.events.append(("call", script, outcome))
        self.seconds = seconds
        self.durations.append(seconds)

    def redis_error(self, error_type: str, fault: str) -> None:
        self.events.append(("error", error_type, fault))

    def breaker_changed(self, node: str, state: BreakerState) -> None:
        self.events.append(("breaker", node, state))

    def threshold_reached(self, metric: str, threshold: int) -> None:
        self.events.append(("threshold", metric, threshold))

    def events_dropped(self, count: int) -> None:
        self.events.append(("dropped", count))

    def take(self) -> list[tuple[Any, ...]]:
        """The events since the last take (an assertion here, not in the hooks: the guard
        would log it and go on)."""
        assert all(0 < seconds < 10 for seconds in self.durations), self.durations
        taken, self.events, self.durations = self.events, [], []
        return taken


def observed(make_guard: MakeGuard, **options: Any) -> tuple[UsageGuard, Recorder]:
    guard = make_guard(plans=PLANS, default_plan="free", **options)
    recorder = guard.observe(Recorder())
    if guard.backend.cluster:  # its nodes get their breakers as calls reach them
        assert recorder.take() == []
        guard.usage("acme")
        (node,) = guard.stats().breakers
        assert recorder.take()[0] == ("breaker", node, "closed")
    else:
        assert recorder.take() == [("breaker", node_name(guard.backend.client_url), "closed")]
    return guard, recorder


def test_every_decision_call_and_threshold_is_observed(make_guard: MakeGuard) -> None:
    guard, seen = observed(make_guard)
    assert guard.consume("acme", "emails", 8, user="alice").allowed
    assert seen.take() == [
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
        ("threshold", "emails", 80),
    ]
    assert not guard.consume("acme", "emails", 5).allowed
    guard.check("acme", "emails", 1)
    assert seen.take() == [
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", False),
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
    ]
    # Several metrics: each one decided; a personal budget's decision says so.
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    guard.consume("acme", {"contacts": 2, "ai_tokens": 50}, user="alice")
    assert seen.take() == [
        ("call", "admin", "ok"),
        ("call", "consume", "ok"),
        ("decision", "contacts", "organization", True),
        ("decision", "ai_tokens", "personal", True),
    ]
    reservation = guard.reserve("acme", "ai_tokens", 10)
    reservation.settle(5)
    guard.usage("acme")
    assert seen.take() == [
        ("call", "consume", "ok"),
        ("decision", "ai_tokens", "organization", True),
        ("call", "adjust", "ok"),
        ("call", "read", "ok"),
    ]


def test_no_org_or_user_ever_reaches_an_observer(make_guard: MakeGuard) -> None:
    guard, seen = observed(make_guard)
    guard.consume("org-secret", "emails", 9, user="user-secret")
    guard.consume("org-secret", "emails", 9, user="user-secret")
    guard.reserve("org-secret", "ai_tokens", 1, user="user-secret").cancel()
    assert len(seen.events) > 5
    assert not [e for e in seen.events if any("secret" in str(part) for part in e)]


def test_the_async_twin_is_observed_the_same_and_shares_stats(make_guard: MakeGuard) -> None:
    guard, seen = observed(make_guard)

    async def calls() -> Stats:
        aio = guard.aio
        assert (await aio.consume("acme", "emails", 9)).allowed
        assert not (await aio.consume("acme", "emails", 9)).allowed
        stats = aio.stats()  # not a coroutine
        await aio.aclose()
        return stats

    stats = asyncio.run(calls())
    assert seen.take() == [
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
        ("threshold", "emails", 80),
        ("threshold", "emails", 90),
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", False),
    ]
    assert isinstance(stats, Stats) and stats == guard.stats()


class Failing:
    """Stands in for a memory:// runner's ``run``: raises ``error`` while set."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self.real = run
        self.error: Exception | None = None

    def __call__(self, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.real(*args)


def failing_runner(guard: UsageGuard, monkeypatch: pytest.MonkeyPatch) -> Failing:
    runner = guard.backend.sync()
    failing = Failing(runner.run)
    monkeypatch.setattr(runner, "run", failing)
    return failing


def test_an_outage_is_observed_and_counted_by_class(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = UsageGuard.from_url(
        "memory://", plans=PLANS, default_plan="free", on_backend_error={"emails": "deny"}
    )
    seen = guard.observe(Recorder())
    assert guard.runtime.breaker is not None
    guard.runtime.breaker.interval = 0.05
    failing = failing_runner(guard, monkeypatch)
    failing.error = redis.ConnectionError("refused")
    seen.take()
    assert not guard.consume("acme", "emails").allowed  # fails closed
    assert seen.take() == [
        ("breaker", "memory://", "open"),
        ("call", "consume", "outage"),
        ("error", "ConnectionError", "outage"),
        ("decision", "emails", "unavailable", False),
    ]
    # The breaker answers at once: no Redis call, its own class of error.
    assert guard.consume("acme", "ai_tokens").allowed  # fails open
    assert seen.take() == [
        ("error", "CircuitOpen", "outage"),
        ("decision", "ai_tokens", "unavailable", True),
    ]
    stats = guard.stats()
    assert stats.breakers == {"memory://": "open"} and stats.failing
    assert stats.backend_errors == 2 == guard.failures.backend_errors
    assert dict(stats.backend_errors_by_class) == {"ConnectionError": 1, "CircuitOpen": 1}
    # Redis is back: the probe answers and closes the breaker.
    failing.error = None
    time.sleep(0.06)
    assert guard.consume("acme", "emails").scope == "organization"
    assert seen.take() == [
        ("breaker", "memory://", "closed"),
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
    ]
    stats = guard.stats()
    assert stats.breakers == {"memory://": "closed"} and not stats.failing
    assert stats.backend_errors == 2  # a snapshot: it does not move with the guard


def test_an_async_outage_is_observed_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = UsageGuard.from_url("memory://", plans=PLANS, default_plan="free")
    seen = guard.observe(Recorder())
    seen.take()

    async def calls() -> None:
        runner = guard.backend.aio()

        async def refused(*args: Any) -> Any:
            raise redis.ConnectionError("refused")

        monkeypatch.setattr(runner, "run", refused)
        assert (await guard.aio.consume("acme", "emails")).scope == "unavailable"
        assert (await guard.aio.consume("acme", "emails")).scope == "unavailable"
        await guard.aio.aclose()

    asyncio.run(calls())
    assert seen.take() == [
        ("breaker", "memory://", "open"),
        ("call", "consume", "outage"),
        ("error", "ConnectionError", "outage"),
        ("decision", "emails", "unavailable", True),
        ("error", "CircuitOpen", "outage"),
        ("decision", "emails", "unavailable", True),
    ]
    assert guard.aio.stats().backend_errors_by_class == {"ConnectionError": 1, "CircuitOpen": 1}


def test_reads_and_admin_calls_report_their_error_and_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guard = UsageGuard.from_url("memory://", plans=PLANS, default_plan="free")
    seen = guard.observe(Recorder())
    failing_runner(guard, monkeypatch).error = redis.TimeoutError("slow")
    seen.take()
    with pytest.raises(Exception, match="slow"):
        guard.usage("acme")
    assert seen.take() == [
        ("breaker", "memory://", "open"),
        ("call", "read", "outage"),
        ("error", "TimeoutError", "outage"),
    ]
    assert guard.stats().backend_errors_by_class == {"TimeoutError": 1}


def test_an_observer_that_raises_breaks_no_request(
    make_guard: MakeGuard, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Observer):
        def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
            raise RuntimeError("observer bug")

        def redis_call(self, script: str, seconds: float, outcome: str) -> None:
            raise RuntimeError("observer bug")

    guard = make_guard(plans=PLANS, default_plan="free")
    guard.observe(Broken())
    after = guard.observe(Recorder())  # the next observer still hears everything
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        decisions = [guard.consume("acme", "emails") for _ in range(5)]
    assert all(d.allowed and d.scope == "organization" for d in decisions)
    heard = [e for e in after.take() if e[0] != "breaker"]  # a node's, on install or first use
    assert len(heard) == 10
    assert guard.stats().observer_errors == 10
    logged = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # one a minute at most


def test_only_observers_are_installed(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    with pytest.raises(InvalidUsage, match=r"subclass usage_guard\.Observer"):
        guard.observe(print)  # type: ignore[type-var]
    assert guard.runtime.observer is None


def test_dropped_threshold_events_are_observed(
    make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listeners, "QUEUE_SIZE", 0)
    guard, seen = observed(make_guard)
    guard.on_threshold(lambda event: None)
    guard.consume("acme", "emails", 9)  # crosses 80 and 90 %: no room for either
    assert ("dropped", 2) in seen.take()
    assert guard.stats().dropped_events == 2


def test_without_an_observer_the_hot_path_calls_nothing_more(make_guard: MakeGuard) -> None:
    """No frame of usage_guard.observe, no clock read for the latency."""
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.consume("acme", "emails")  # prepared, connected
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            called.append(frame.f_code.co_filename)
        elif event == "c_call":
            called.append(getattr(arg, "__name__", ""))

    sys.setprofile(profile)
    try:
        guard.consume("acme", "emails")
    finally:
        sys.setprofile(None)
    assert "perf_counter" not in called
    assert not [f for f in called if f.endswith("observe.py")]
    # ... which an observer does need: the test above would notice losing them.
    guard.observe(Observer())
    sys.setprofile(profile)
    try:
        guard.consume("acme", "emails")
    finally:
        sys.setprofile(None)
    assert "perf_counter" in called and [f for f in called if f.endswith("observe.py")]


def test_stats_are_a_frozen_snapshot(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    stats = guard.stats()
    assert stats == Stats(
        backend_errors=0,
        unexpected_errors=0,
        unsettled=0,
        dropped_events=0,
        backend_errors_by_class={},
        breakers=stats.breakers,
        failing=False,
        settles_pending=0,
        events_pending=0,
        observer_errors=0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.backend_errors = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.breakers["x"] = "open"  # type: ignore[index]


@pytest.mark.parametrize(
    ("url", "node"),
    [
        ("redis://user:secret@cache.internal:6380/0", "cache.internal:6380"),
        ("rediss://:secret@10.0.0.7/1?ssl_cert_reqs=none", "10.0.0.7:6379"),
        ("redis://[::1]:7000/0", "[::1]:7000"),
        ("redis://127.0.0.1:6379/15?client=redis-py", "127.0.0.1:6379"),
        ("unix:///run/redis.sock?db=0", "/run/redis.sock"),
        ("memory://shared", "memory://shared"),
    ],
)
def test_nodes_are_named_without_credentials(url: str, node: str) -> None:
    assert node_name(url) == node


# -- a real server, paused --------------------------------------------------------------


def test_a_hung_server_is_observed_timing_out_then_the_breaker_opens_and_closes(
    redis_process: RedisProcess, paused: Callable[[bool], None]
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.3)
    node = f"127.0.0.1:{redis_process.port}"
    seen = guard.observe(Recorder())
    assert seen.take() == [("breaker", node, "closed")]
    assert guard.consume("acme", "emails").allowed
    assert seen.seconds < 0.3
    seen.take()
    paused(True)
    assert guard.consume("acme", "emails").scope == "unavailable"
    assert seen.seconds >= 0.3  # the timeout, measured
    assert seen.take() == [
        ("breaker", node, "open"),
        ("call", "consume", "outage"),
        ("error", "TimeoutError", "outage"),
        ("decision", "emails", "unavailable", True),
    ]
    assert guard.stats().breakers == {node: "open"}
    paused(False)
    time.sleep(PROBE_INTERVAL)
    assert guard.consume("acme", "emails").scope == "organization"
    assert seen.take() == [
        ("breaker", node, "closed"),
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
    ]
    stats = guard.stats()
    assert stats.breakers == {node: "closed"}
    assert stats.backend_errors_by_class == {"TimeoutError": 1}
    guard.close(timeout=0)


def test_the_async_guard_is_observed_through_an_outage_too(
    redis_process: RedisProcess, paused: Callable[[bool], None]
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.3)
    node = f"127.0.0.1:{redis_process.port}"
    seen = guard.observe(Recorder())

    async def calls() -> None:
        aio = guard.aio
        assert (await aio.consume("acme", "emails")).allowed
        paused(True)
        seen.take()
        assert (await aio.consume("acme", "emails")).scope == "unavailable"
        assert (await aio.consume("acme", "emails")).scope == "unavailable"  # fails fast
        paused(False)
        await asyncio.sleep(PROBE_INTERVAL)
        assert (await aio.consume("acme", "emails")).scope == "organization"
        await aio.aclose()

    asyncio.run(calls())
    events = seen.take()
    assert events[:3] == [
        ("breaker", node, "open"),
        ("call", "consume", "outage"),
        ("error", "TimeoutError", "outage"),
    ]
    assert ("error", "CircuitOpen", "outage") in events
    assert events[-3:] == [
        ("breaker", node, "closed"),
        ("call", "consume", "ok"),
        ("decision", "emails", "organization", True),
    ]
    assert guard.stats().backend_errors_by_class == {"TimeoutError": 1, "CircuitOpen": 1}
    guard.close(timeout=0)

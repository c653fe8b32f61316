"""The OpenTelemetry adapter: each series, its attributes and values, read back with the
SDK's in-memory reader; never an organization or a user as an attribute."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from conftest import RedisProcess
from usage_guard import OpenTelemetryObserver, Plan, UsageGuard, listeners
from usage_guard.otel import DURATION_BUCKETS
from usage_guard.runtime import PROBE_INTERVAL

PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 1000})}
MakeGuard = Callable[..., UsageGuard]
Attributes = frozenset[tuple[str, Any]]


class Metrics:
    """The adapter on a MeterProvider of its own, and what its reader collects."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.observer = OpenTelemetryObserver(self.provider)

    def collect(self) -> dict[str, dict[Attributes, Any]]:
        """Per series, per attribute set: a sum or gauge's value, a histogram's point."""
        series: dict[str, dict[Attributes, Any]] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "usage_guard"
                for metric in scope.metrics:
                    points = series.setdefault(metric.name, {})
                    for point in metric.data.data_points:
                        key = frozenset((point.attributes or {}).items())
                        if isinstance(point, HistogramDataPoint):
                            points[key] = point
                        else:
                            assert isinstance(point, NumberDataPoint)
                            points[key] = point.value
        return series

    def units(self) -> dict[str, str]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            metric.name: metric.unit or ""
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    made = Metrics()
    yield made
    made.provider.shutdown()


def attrs(**values: Any) -> Attributes:
    return frozenset({k.replace("_", "."): v for k, v in values.items()}.items())


def test_decisions_calls_thresholds_and_the_breaker_are_recorded(
    make_guard: MakeGuard, metrics: Metrics
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.observe(metrics.observer)
    guard.consume("acme", "emails", 9, user="alice")  # 80 and 90 %
    guard.consume("acme", "emails", 5, user="alice")  # denied
    guard.consume("acme", "emails", 1)  # 100 %
    guard.usage("acme")
    series = metrics.collect()
    assert series["usage_guard.decisions"] == {
        attrs(metric="emails", scope="organization", outcome="allowed"): 2,
        attrs(metric="emails", scope="organization", outcome="denied"): 1,
    }
    durations = series["usage_guard.redis.duration"]
    assert set(durations) == {
        attrs(script="consume", outcome="ok"),
        attrs(script="read", outcome="ok"),
    }
    consumes = durations[attrs(script="consume", outcome="ok")]
    assert consumes.count == 3 and 0 < consumes.sum < 3
    assert tuple(consumes.explicit_bounds) == DURATION_BUCKETS
    assert series["usage_guard.thresholds"] == {
        attrs(metric="emails", threshold=80): 1,
        attrs(metric="emails", threshold=90): 1,
        attrs(metric="emails", threshold=100): 1,
    }
    # One node's, or on a Cluster each node's the calls reached.
    assert series["usage_guard.breaker.open"] == {attrs(node=n): 0 for n in guard.stats().breakers}
    assert "usage_guard.redis.errors" not in series  # none yet
    assert metrics.units()["usage_guard.redis.duration"] == "s"
    # No attribute names an organization or a user.
    values = {value for points in series.values() for key in points for _, value in key}
    assert not values & {"acme", "alice"}


def test_an_outage_is_recorded_by_error_class_and_breaker(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = UsageGuard.from_url(
        "memory://", plans=PLANS, default_plan="free", on_backend_error={"emails": "deny"}
    )
    guard.observe(metrics.observer)
    runner = guard.backend.sync()

    def refused(*args: Any) -> Any:
        raise redis.ConnectionError("refused")

    monkeypatch.setattr(runner, "run", refused)
    guard.consume("acme", "emails")
    guard.consume("acme", "ai_tokens")  # the breaker answers
    series = metrics.collect()
    assert series["usage_guard.redis.errors"] == {
        attrs(error_type="ConnectionError", fault="outage"): 1,
        attrs(error_type="CircuitOpen", fault="outage"): 1,
    }
    assert series["usage_guard.decisions"] == {
        attrs(metric="emails", scope="unavailable", outcome="denied"): 1,
        attrs(metric="ai_tokens", scope="unavailable", outcome="allowed"): 1,
    }
    # Only the call that was sent has a duration.
    assert (
        series["usage_guard.redis.duration"][attrs(script="consume", outcome="outage")].count == 1
    )
    assert series["usage_guard.breaker.open"] == {attrs(node="memory://"): 1}


def test_dropped_events_are_counted(
    make_guard: MakeGuard, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listeners, "QUEUE_SIZE", 0)
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.observe(metrics.observer)
    guard.on_threshold(lambda event: None)
    guard.consume("acme", "emails", 9)
    assert metrics.collect()["usage_guard.events.dropped"] == {frozenset(): 2}


def test_an_observer_installed_during_an_outage_sees_the_open_breaker(metrics: Metrics) -> None:
    guard = UsageGuard.from_url("memory://shared-otel", plans=PLANS, default_plan="free")
    assert guard.runtime.breaker is not None
    guard.runtime.breaker.failed()
    guard.observe(metrics.observer)
    assert metrics.collect()["usage_guard.breaker.open"] == {attrs(node="memory://shared-otel"): 1}


def test_a_hung_server_opens_the_breaker_gauge_and_a_probe_closes_it(
    redis_process: RedisProcess, paused: Callable[[bool], None], metrics: Metrics
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.3)
    guard.observe(metrics.observer)
    node = attrs(node=f"127.0.0.1:{redis_process.port}")
    guard.consume("acme", "emails")
    assert metrics.collect()["usage_guard.breaker.open"] == {node: 0}
    paused(True)
    for _ in range(3):
        guard.consume("acme", "emails")
    series = metrics.collect()
    assert series["usage_guard.breaker.open"] == {node: 1}
    assert series["usage_guard.redis.errors"] == {
        attrs(error_type="TimeoutError", fault="outage"): 1,
        attrs(error_type="CircuitOpen", fault="outage"): 2,
    }
    timed_out = series["usage_guard.redis.duration"][attrs(script="consume", outcome="outage")]
    assert timed_out.count == 1 and timed_out.sum >= 0.3
    paused(False)
    time.sleep(PROBE_INTERVAL)
    guard.consume("acme", "emails")
    assert metrics.collect()["usage_guard.breaker.open"] == {node: 0}
    guard.close(timeout=0)


def test_durations_can_be_left_out(make_guard: MakeGuard) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.observe(OpenTelemetryObserver(provider, durations=False))
    guard.consume("acme", "emails")
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert names == {"usage_guard.decisions", "usage_guard.breaker.open"}
    provider.shutdown()

"""An :class:`~usage_guard.Observer` that records OpenTelemetry metrics
(``pip install 'usage_guard[otel]'``): ``guard.observe(OpenTelemetryObserver())``.

It uses the OpenTelemetry metrics API only: the application's ``MeterProvider``
(the global one unless given) decides where they go: OTLP, or Prometheus through
``opentelemetry-exporter-prometheus`` (dots become underscores, counters end in
``_total``, the histogram in ``_seconds``). No attribute ever names an organization
or a user.

=============================  ================  ==================================
series                         instrument        attributes
=============================  ================  ==================================
``usage_guard.decisions``      counter           ``metric``, ``scope``, ``outcome``
``usage_guard.redis.duration`` histogram (s)     ``script``, ``outcome``
``usage_guard.redis.errors``   counter           ``error.type``, ``fault``
``usage_guard.breaker.open``   gauge (0 or 1)    ``node``
``usage_guard.thresholds``     counter           ``metric``, ``threshold``
``usage_guard.events.dropped`` counter           (none)
=============================  ================  ==================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
from opentelemetry.util.types import Attributes

from .decision import Scope
from .observe import BreakerState, Observer

__all__ = ["DURATION_BUCKETS", "OpenTelemetryObserver"]

#: Bucket boundaries of ``usage_guard.redis.duration`` (seconds): a call on loopback
#: takes ~0.1 ms, one that times out ``timeout`` (1 s by default).
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class OpenTelemetryObserver(Observer):
    """Records a guard's decisions, Redis calls, errors, breakers and thresholds as
    OpenTelemetry metrics on ``meter_provider`` (default: the global one). One adapter
    may observe several guards: their series add up.

    Counters are summed here and read by the SDK when it collects (observable
    counters): a sum under a lock costs a fraction of a microsecond, the SDK's own
    ``Counter.add`` several. The duration histogram has no such form: each Redis call
    is one ``Histogram.record`` (``durations=False`` leaves it out).
    """

    def __init__(
        self, meter_provider: MeterProvider | None = None, *, durations: bool = True
    ) -> None:
        meter = metrics.get_meter("usage_guard", _version(), meter_provider=meter_provider)
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str, bool], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._thresholds: dict[tuple[str, int], int] = {}
        self._dropped = 0
        self._open: dict[str, int] = {}
        self._duration: Histogram | None = None
        if durations:
            self._duration = meter.create_histogram(
                "usage_guard.redis.duration",
                unit="s",
                description="Duration of the script calls sent to Redis",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
        #: Per (script, outcome), its attributes, built once (a few scripts, a few outcomes).
        self._call_attributes: dict[tuple[str, str], Attributes] = {}
        meter.create_observable_counter(
            "usage_guard.decisions",
            callbacks=[self._observe_decisions],
            unit="{decision}",
            description="Decisions of consume, check and reserve (outage policy's included)",
        )
        meter.create_observable_counter(
            "usage_guard.redis.errors",
            callbacks=[self._observe_errors],
            unit="{error}",
            description="Calls that failed (sent or not), by exception class and fault",
        )
        meter.create_observable_gauge(
            "usage_guard.breaker.open",
            callbacks=[self._observe_breakers],
            description="1 while a node's breaker is open (calls fail fast), else 0",
        )
        meter.create_observable_counter(
            "usage_guard.thresholds",
            callbacks=[self._observe_thresholds],
            unit="{event}",
            description="Organization meters that reached 80, 90 or 100 % of their limit",
        )
        meter.create_observable_counter(
            "usage_guard.events.dropped",
            callbacks=[self._observe_dropped],
            unit="{event}",
            description="Threshold events dropped: the listeners' queue was full",
        )

    # -- the hook ---------------------------------------------------------------------

    def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
        key = (metric, scope, allowed)
        with self._lock:
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def redis_call(self, script: str, seconds: float, outcome: str) -> None:
        if self._duration is None:
            return
        key = (script, outcome)
        attributes = self._call_attributes.get(key)
        if attributes is None:
            attributes = self._call_attributes[key] = {"script": script, "outcome": outcome}
        self._duration.record(seconds, attributes)

    def redis_error(self, error_type: str, fault: str) -> None:
        key = (error_type, fault)
        with self._lock:
            self._errors[key] = self._errors.get(key, 0) + 1

    def breaker_changed(self, node: str, state: BreakerState) -> None:
        with self._lock:
            self._open[node] = 1 if state == "open" else 0

    def threshold_reached(self, metric: str, threshold: int) -> None:
        key = (metric, threshold)
        with self._lock:
            self._thresholds[key] = self._thresholds.get(key, 0) + 1

    def events_dropped(self, count: int) -> None:
        with self._lock:
            self._dropped += count

    # -- read by the SDK when it collects -----------------------------------------------

    def _observe_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._decisions.items())
        return [
            Observation(
                total,
                {"metric": metric, "scope": scope, "outcome": "allowed" if allowed else "denied"},
            )
            for (metric, scope, allowed), total in totals
        ]

    def _observe_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._errors.items())
        return [
            Observation(total, {"error.type": error_type, "fault": fault})
            for (error_type, fault), total in totals
        ]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            states = list(self._open.items())
        return [Observation(value, {"node": node}) for node, value in states]

    def _observe_thresholds(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._thresholds.items())
        return [
            Observation(total, {"metric": metric, "threshold": threshold})
            for (metric, threshold), total in totals
        ]

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            dropped = self._dropped
        return [Observation(dropped)] if dropped else []


def _version() -> str:
    try:
        return version("usage_guard")
    except PackageNotFoundError:  # running from a source tree
        return ""

"""Instrumentation: one hook fed with what an operator alerts on, and ``guard.stats()``.

An :class:`Observer` (subclass it, override what you need) installed with
``guard.observe(observer)`` hears, on the caller's thread or event loop:

* every decision of ``consume``, ``check`` and ``reserve``: metric, scope, allowed,
  the outage policy's (``scope="unavailable"``) included;
* every script call sent to Redis: the script's name, its seconds and how it ended
  (``"ok"`` or the :class:`~usage_guard.faults.Fault` of its error);
* every failed call by its exception's class name (``TimeoutError``,
  ``ConnectionError``, ``CircuitOpen``, ``BudgetSpent``, ...) and fault;
* each breaker opening or closing, by node (``"127.0.0.1:6379"``);
* threshold events (metric, percent) and threshold events dropped.

Never an organization or a user: a metrics backend keeps one series per label value.
An observer that raises is logged (one ERROR a minute at most) and counted
(``Stats.observer_errors``); the request goes on. Without an observer the hot path
pays one attribute check per call.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from .decision import Decision, Scope, ThresholdEvent
from .failures import LOG_INTERVAL
from .faults import Fault

logger = logging.getLogger("usage_guard")

T = TypeVar("T")
BreakerState = Literal["closed", "open"]


class Observer:
    """The instrumentation hook: one method per kind of event, each doing nothing here.

    Subclass it and override what you need. Methods run on the request's thread (or
    event loop) and must be quick: count, do not block. ``usage_guard.otel`` has one
    for OpenTelemetry (and Prometheus through its exporter).
    """

    def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
        """A consumption decided (``consume``, ``check``, ``reserve``): by Redis, or by
        the outage policy (``scope="unavailable"``). A call of several metrics reports
        each metric it admitted, or the one that denied."""

    def redis_call(self, script: str, seconds: float, outcome: str) -> None:
        """A script call sent to Redis (``consume``, ``adjust``, ``read``, ``admin``,
        ``ratelimit``): ``seconds`` from sending it to its reply read; ``outcome`` is
        ``"ok"`` or the fault of its error (``"outage"``, ``"misconfigured"``,
        ``"data"``, ``"unexpected"``, see :mod:`usage_guard.faults`). Calls not sent
        (the breaker open, the request's budget spent) are not Redis calls."""

    def redis_error(self, error_type: str, fault: str) -> None:
        """A call that failed, whether sent or not: its exception's class name
        (``TimeoutError``, ``ConnectionError``, ``CircuitOpen``, ``BudgetSpent``, ...)
        and its fault (``"outage"``, ``"misconfigured"``, ``"data"``, ``"unexpected"``)."""

    def breaker_changed(self, node: str, state: BreakerState) -> None:
        """A node's breaker opened or closed. Also called for every node's current state
        when the observer is installed."""

    def threshold_reached(self, metric: str, threshold: int) -> None:
        """An organization's meter reached ``threshold`` percent (80, 90, 100) of its
        limit: what ``on_threshold`` listeners receive, without the organization."""

    def events_dropped(self, count: int) -> None:
        """Threshold events the listeners' queue could not take."""


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of what went wrong with Redis so far (``guard.stats()``)."""

    #: Calls the outage policy answered: outages and misconfigurations.
    backend_errors: int
    #: Calls answered by the policy after an error that is neither (a bug, a script
    #: error): logged with its traceback.
    unexpected_errors: int
    #: Settles and cancels given up on: their reservations keep their estimate.
    unsettled: int
    #: Threshold events dropped: the listeners' queue was full.
    dropped_events: int
    #: ``backend_errors`` by exception class name (``TimeoutError``, ``CircuitOpen``, ...).
    backend_errors_by_class: Mapping[str, int]
    #: Each node's breaker (``"127.0.0.1:6379"``: ``"open"`` or ``"closed"``); on a
    #: Cluster, those of the nodes it has called.
    breakers: Mapping[str, BreakerState]
    #: Whether calls fail now: set by every outage, cleared by a success that started after.
    failing: bool
    #: Settles and cancels queued until Redis answers again.
    settles_pending: int
    #: Threshold events waiting for their listeners.
    events_pending: int
    #: Times an observer raised (logged, never raised).
    observer_errors: int
    #: Calls sent a second time because the org's plan was not the one this process
    #: knew: assigned by another process, or an org it had not met (or forgotten: it
    #: remembers 65,536 orgs' plans).
    plan_refreshes: int = 0


class Observers(Observer):
    """The observers of one guard (shared by its async twin), each call guarded: an
    observer that raises is logged and counted, never raised."""

    def __init__(self) -> None:
        self.observers: tuple[Observer, ...] = ()
        #: Times an observer raised.
        self.errors = 0
        self._lock = threading.Lock()
        self._logged_at = -math.inf
        self._unlogged = 0

    def add(self, observer: Observer, breakers: Mapping[str, BreakerState]) -> None:
        """Install ``observer`` and tell it each node's breaker state."""
        with self._lock:
            self.observers = (*self.observers, observer)
        for node, state in breakers.items():
            try:
                observer.breaker_changed(node, state)
            except Exception as error:
                self._failed(observer, error)

    # -- what the runtime reports ---------------------------------------------------------

    def answered(
        self, script: str, sent: float, result: object, events: Sequence[ThresholdEvent]
    ) -> None:
        """A call Redis answered: its latency, its decision, the thresholds it crossed."""
        self.redis_call(script, time.perf_counter() - sent, "ok")
        if type(result) is Decision:
            self._decided(result)
        for event in events:
            self.threshold_reached(event.metric, event.threshold)

    def failed(self, script: str, sent: float | None, error: Exception, fault: Fault) -> None:
        """A call that failed (``sent``: None when it was never sent)."""
        if sent is not None:
            self.redis_call(script, time.perf_counter() - sent, fault.value)
        self.redis_error(type(error).__name__, fault.value)

    def fallback(self, result: T) -> T:
        """The outage policy's answer to a failed call, reported when it is a decision."""
        if isinstance(result, Decision):
            self._decided(result)
        return result

    def _decided(self, decision: Decision) -> None:
        self.decision(decision.metric, decision.scope, decision.allowed)
        for other in decision.others:
            self.decision(other.metric, other.scope, other.allowed)

    # -- fanned out, guarded --------------------------------------------------------------

    def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
        self._tell("decision", metric, scope, allowed)

    def redis_call(self, script: str, seconds: float, outcome: str) -> None:
        self._tell("redis_call", script, seconds, outcome)

    def redis_error(self, error_type: str, fault: str) -> None:
        self._tell("redis_error", error_type, fault)

    def breaker_changed(self, node: str, state: BreakerState) -> None:
        self._tell("breaker_changed", node, state)

    def threshold_reached(self, metric: str, threshold: int) -> None:
        self._tell("threshold_reached", metric, threshold)

    def events_dropped(self, count: int) -> None:
        self._tell("events_dropped", count)

    def _tell(self, event: str, *details: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*details)
            except Exception as error:
                self._failed(observer, error)

    def _failed(self, observer: Observer, error: Exception) -> None:
        """Count; log with the traceback, one ERROR a minute at most (an observer that
        raises on every call would otherwise log on every call)."""
        now = time.monotonic()
        with self._lock:
            self.errors += 1
            if now - self._logged_at < LOG_INTERVAL:
                self._unlogged += 1
                return
            self._logged_at, skipped, self._unlogged = now, self._unlogged, 0
        since = f"; {skipped} more observer errors since the last report" if skipped else ""
        logger.error(
            "usage_guard: observer %r raised (ignored)%s",
            observer,
            since,
            exc_info=(type(error), error, error.__traceback__),
        )

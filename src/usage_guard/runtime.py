"""The one place that holds a guard's mutable runtime state: its failures, its outage
policy's answers, its breaker, the request's wait budget and its threshold listeners
(shared by a guard and its async twin)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from .catalog import Catalog, Metric
from .context import current_budget
from .decision import Decision
from .errors import BackendMisconfigured, BackendUnavailable, CorruptedCounter, InvalidUsage
from .failures import Failures
from .faults import (
    DATA_REPLY,
    BudgetSpent,
    CircuitOpen,
    Fault,
    LateReply,
    PlanChanging,
    classify,
)
from .listeners import Dispatcher, Listener
from .observe import BreakerState, Observer, Observers, Stats
from .periods import Period

if TYPE_CHECKING:
    from .calls import Call

T = TypeVar("T")
BackendErrorPolicy = Literal["allow", "deny"]

#: Seconds between two probes of a node whose breaker is open.
PROBE_INTERVAL = 0.5


class Breaker:
    """A node's circuit breaker. After an outage (a timeout, a refused connection, an
    outage reply) it opens: calls fail fast as unavailable, without waiting for the
    node, except one probe at most every ``interval`` seconds. A probe waits at most
    ``timeout``, and the next one may start only after that: never two in flight, and
    a probe that never ends (a cancelled task) cannot hold the breaker open. Any
    answer from the node closes it.

    ``node`` names the node in metrics and ``guard.stats()`` (``"127.0.0.1:6379"``,
    never credentials); :meth:`Runtime.watch` makes it report its changes."""

    def __init__(self, timeout: float, interval: float = PROBE_INTERVAL, *, node: str = "") -> None:
        self.timeout = timeout
        self.interval = interval
        self.node = node
        self.open = False
        #: Told ``(node, "open" | "closed")`` on every change (set by Runtime.watch).
        self.report: Callable[[str, BreakerState], None] | None = None
        self._next_probe = 0.0
        self._lock = threading.Lock()

    def admits(self) -> bool:
        """Whether a call may go to the node now (while open: as the probe)."""
        if not self.open:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next_probe:
                return False
            self._next_probe = now + self.timeout + self.interval
            return True

    def failed(self) -> None:
        with self._lock:
            opened, self.open = not self.open, True
            self._next_probe = time.monotonic() + self.interval
        if opened and self.report is not None:
            self.report(self.node, "open")

    def answered(self) -> None:
        if self.open:
            with self._lock:
                closed, self.open = self.open, False
            if closed and self.report is not None:
                self.report(self.node, "closed")


def node_name(url: str) -> str:
    """How metrics and ``guard.stats()`` name the node of a single-server URL:
    ``host:port``, a unix socket's path, or the ``memory://`` URL; never credentials."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        host = parts.hostname or "localhost"
        return f"[{host}]:{parts.port or 6379}" if ":" in host else f"{host}:{parts.port or 6379}"
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class Runtime:
    """Failures counted and logged, the ``on_backend_error`` policy, the breaker, the
    request's wait budget, threshold listeners."""

    def __init__(
        self,
        catalog: Catalog,
        on_backend_error: BackendErrorPolicy | Mapping[str, BackendErrorPolicy] = "allow",
        breaker: Breaker | None = None,
    ) -> None:
        self.catalog = catalog
        self.deny_on_backend_error = self._backend_policy(on_backend_error)
        self.listeners: list[Listener] = []
        self.failures = Failures()
        self.events = Dispatcher(self.listeners, self.failures, self._events_dropped)
        #: The installed observers (None: none; the hot path checks only this).
        self.observer: Observers | None = None
        #: Every node's breaker, by node name, for stats and observers.
        self.breakers: dict[str, Breaker] = {}
        #: The breaker of the one node a single-server backend talks to (None: a Cluster).
        self.breaker = breaker
        if breaker is not None:
            self.watch(breaker)

    def watch(self, breaker: Breaker) -> Breaker:
        """Report ``breaker``'s state in :meth:`stats` and to the observers, now (a
        Cluster's nodes get theirs as calls reach them) and on every change."""
        breaker.report = self._breaker_changed
        self.breakers[breaker.node] = breaker
        self._breaker_changed(breaker.node, "open" if breaker.open else "closed")
        return breaker

    def observe(self, observer: Observer) -> None:
        """Install ``observer``; it hears every node's breaker state at once."""
        if not isinstance(observer, Observer):
            raise InvalidUsage("an observer must subclass usage_guard.Observer")
        observers = self.observer or Observers()
        observers.add(observer, self._breaker_states())
        self.observer = observers

    def stats(self, settles_pending: int = 0, plan_refreshes: int = 0) -> Stats:
        """A snapshot of the failures, breakers and queues (see :class:`Stats`)."""
        failures = self.failures
        return Stats(
            backend_errors=failures.backend_errors,
            unexpected_errors=failures.unexpected_errors,
            unsettled=failures.unsettled,
            dropped_events=failures.dropped_events,
            backend_errors_by_class=MappingProxyType(failures.by_class()),
            breakers=MappingProxyType(self._breaker_states()),
            failing=failures.failing,
            settles_pending=settles_pending,
            events_pending=self.events.pending,
            observer_errors=0 if self.observer is None else self.observer.errors,
            plan_refreshes=plan_refreshes,
        )

    def _breaker_states(self) -> dict[str, BreakerState]:
        return {
            node: "open" if breaker.open else "closed"
            for node, breaker in list(self.breakers.items())
        }

    def _breaker_changed(self, node: str, state: BreakerState) -> None:
        if self.observer is not None:
            self.observer.breaker_changed(node, state)

    def _events_dropped(self, count: int) -> None:
        if self.observer is not None:
            self.observer.events_dropped(count)

    def _backend_policy(
        self, policy: BackendErrorPolicy | Mapping[str, BackendErrorPolicy]
    ) -> frozenset[str]:
        """The metrics that fail closed."""
        if isinstance(policy, str):
            policy = dict.fromkeys((m.name for m in self.catalog), policy)
        for metric, choice in policy.items():
            self.catalog.require(metric)
            if choice not in ("allow", "deny"):
                raise InvalidUsage(f"on_backend_error[{metric!r}] must be 'allow' or 'deny'")
        return frozenset(m for m, choice in policy.items() if choice == "deny")

    def unavailable(self, items: Sequence[tuple[Metric, int]], period: Period) -> Decision:
        """The policy's decision for a consumption that Redis could not answer."""
        denying = [m for m, _ in items if m.name in self.deny_on_backend_error]
        metric = denying[0] if denying else items[0][0]
        return Decision(
            allowed=not denying,
            metric=metric.name,
            scope="unavailable",
            used=0,
            limit=None,
            remaining=None,
            resets_at=period.end if metric.monthly else None,
        )

    def admit(self, call: Call[Any], timeout: float) -> float | None:
        """How long ``call`` may wait for Redis: what the current request has left of
        its ``timeout`` (None: all of it, as for the request's first call). Raises a
        timeout when nothing is left, and :class:`CircuitOpen` while the node's breaker
        refuses calls, so the policy answers at once."""
        wait = None
        budget = current_budget()
        if budget is not None and call.bounded:
            if budget.deadline is None:
                budget.deadline = time.monotonic() + timeout
            else:
                wait = budget.deadline - time.monotonic()
                if wait <= 0:
                    raise BudgetSpent("this request's time for Redis is spent")
        # Last: a call the breaker admits as its probe is sent.
        breaker = self.breaker
        if breaker is not None and breaker.open and not breaker.admits():
            raise CircuitOpen("Redis failed and is not asked again until a probe answers")
        return wait

    def completed(
        self, call: Call[T], reply: Any, failures_before: int, sent: float | None = None
    ) -> T:
        """The result of a call Redis answered; its threshold events go to the listeners.
        ``failures_before``: ``failures.backend_errors`` when the call was sent; ``sent``:
        when (``time.perf_counter()``), taken only while an observer is installed."""
        try:
            result, events = call.parse(reply)
        except LateReply as late:
            return self.failed(call, late, sent)
        if self.failures.failing:
            self.failures.recovered(failures_before)
        if self.breaker is not None and self.breaker.open:
            self.breaker.answered()
        if events:
            self.events.publish(events)
        if sent is not None and self.observer is not None:
            self.observer.answered(call.script, sent, result, events)
        return result

    def failed(
        self, call: Call[T], error: Exception, sent: float | None = None, *, record: bool = True
    ) -> T:
        """Record a failed call; answer by the call's fallback (the outage policy).
        ``sent``: as for :meth:`completed` (None too when the call was not sent)."""
        fault = classify(error)
        if self.breaker is not None and not isinstance(error, (CircuitOpen, BudgetSpent)):
            if fault is Fault.OUTAGE and not isinstance(error, (LateReply, PlanChanging)):
                self.breaker.failed()
            else:
                self.breaker.answered()  # the node answered (late too), or the fault is not its
        observer = self.observer
        if observer is not None:
            observer.failed(call.script, sent, error, fault)
        if fault is Fault.DATA:
            where = str(error).removeprefix(DATA_REPLY).partition(" holds no integer")[0]
            key, _, field = where.partition(" ")
            raise CorruptedCounter(key, field or None) from None
        if record:
            fault = self.failures.record(error)
        if call.fallback is None:
            if fault is Fault.MISCONFIGURED:
                raise BackendMisconfigured(str(error)) from error
            raise BackendUnavailable(str(error)) from error
        return call.fallback() if observer is None else observer.fallback(call.fallback())

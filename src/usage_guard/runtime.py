"""The one place that holds a guard's mutable runtime state: its failures, its outage
policy's answers and its threshold listeners (shared by a guard and its async twin)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from redis.exceptions import TimeoutError as RedisTimeoutError

from .catalog import Catalog, Metric
from .context import current_budget
from .decision import Decision
from .errors import BackendMisconfigured, BackendUnavailable, CorruptedCounter, InvalidUsage
from .failures import Failures
from .faults import DATA_REPLY, Fault, classify
from .listeners import Dispatcher, Listener
from .periods import Period

if TYPE_CHECKING:
    from .calls import Call

T = TypeVar("T")
BackendErrorPolicy = Literal["allow", "deny"]


class Runtime:
    """Failures counted and logged, the ``on_backend_error`` policy, threshold listeners."""

    def __init__(
        self,
        catalog: Catalog,
        on_backend_error: BackendErrorPolicy | Mapping[str, BackendErrorPolicy] = "allow",
    ) -> None:
        self.catalog = catalog
        self.deny_on_backend_error = self._backend_policy(on_backend_error)
        self.listeners: list[Listener] = []
        self.failures = Failures()
        self.events = Dispatcher(self.listeners, self.failures)

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

    def wait(self, call: Call[Any], timeout: float) -> float | None:
        """How long ``call`` may wait for Redis: what the current request has left of
        its ``timeout`` (None: all of it, as for the request's first call). Raises a
        timeout when nothing is left, so the policy answers at once."""
        budget = current_budget()
        if budget is None or not call.bounded:
            return None
        if budget.deadline is None:
            budget.deadline = time.monotonic() + timeout
            return None
        left = budget.deadline - time.monotonic()
        if left <= 0:
            raise RedisTimeoutError("this request's time for Redis is spent")
        return left

    def completed(self, call: Call[T], reply: Any, failures_before: int) -> T:
        """The result of a call Redis answered; its threshold events go to the listeners.
        ``failures_before``: ``failures.backend_errors`` when the call was sent."""
        if self.failures.failing:
            self.failures.recovered(failures_before)
        result, events = call.parse(reply)
        if events:
            self.events.publish(events)
        return result

    def failed(self, call: Call[T], error: Exception) -> T:
        """Record a failed call; answer by the call's fallback (the outage policy)."""
        if classify(error) is Fault.DATA:
            key = str(error).removeprefix(DATA_REPLY).partition(" holds no integer")[0]
            raise CorruptedCounter(key) from None
        fault = self.failures.record(error)
        if call.fallback is None:
            if fault is Fault.MISCONFIGURED:
                raise BackendMisconfigured(str(error)) from error
            raise BackendUnavailable(str(error)) from error
        return call.fallback()

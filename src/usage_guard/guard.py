"""UsageGuard: calls built by :mod:`usage_guard.calls`, each one blocking round trip."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, overload

from .calls import PLAN_TRIES, STALE_PLAN, Amounts, Call, Calls
from .catalog import DEFAULT_CATALOG, Catalog
from .decision import Decision
from .errors import BackendUnavailable, CorruptedCounter, InvalidUsage
from .failures import Failures
from .health import PROBES, Health, assess
from .listeners import Listener
from .observe import Observer, Stats
from .periods import Clock
from .plans import Plan
from .report import Report
from .reservations import Reservation
from .runtime import BackendErrorPolicy, Breaker, Runtime, node_name
from .settling import Settler
from .storage import Backend
from .usage import MemberUsage, Usage

if TYPE_CHECKING:
    from collections.abc import Callable

    from .aio import AsyncUsageGuard
    from .decorator import Amount, Cost, P, R
    from .requirement import Requirement

T = TypeVar("T")
ObserverT = TypeVar("ObserverT", bound=Observer)
logger = logging.getLogger("usage_guard")


class GuardOptions(TypedDict, total=False):
    """The keyword options of :meth:`UsageGuard.from_url` (and of the async twin's)."""

    plans: Mapping[str, Plan] | None
    default_plan: str | None
    catalog: Catalog
    clock: Clock | None
    prefix: str
    history_months: int
    on_backend_error: BackendErrorPolicy | Mapping[str, BackendErrorPolicy]
    timeout: float
    max_connections: int
    reservation_ttl: float


class UsageGuard:
    """Meters usage and enforces plan limits and personal budgets.

    Build one per process with :meth:`from_url`; it is thread-safe. ``guard.aio``
    is its asyncio twin (same plans, clock, listeners and storage).
    """

    def __init__(self, calls: Calls, runtime: Runtime, backend: Backend) -> None:
        #: The configuration (plans, catalog, clock, prefix) and the calls built from it.
        self.calls = calls
        #: Failures, the outage policy and the threshold listeners.
        self.runtime = runtime
        self.backend = backend
        self._aio: AsyncUsageGuard | None = None
        #: Settles and cancels that met an outage, retried until they land.
        self.settler = Settler(partial(self._run, record=False), runtime.failures)

    @classmethod
    def from_url(
        cls,
        url: str = "memory://",
        *,
        plans: Mapping[str, Plan] | None = None,
        default_plan: str | None = None,
        catalog: Catalog = DEFAULT_CATALOG,
        clock: Clock | None = None,
        prefix: str = "ug",
        history_months: int = 6,
        on_backend_error: BackendErrorPolicy | Mapping[str, BackendErrorPolicy] = "allow",
        timeout: float = 1.0,
        max_connections: int = 100,
        reservation_ttl: float = 900,
    ) -> UsageGuard:
        """A guard on ``memory://[NAME]``, ``redis://``, ``rediss://``, ``unix://`` or
        ``redis+cluster://h1:7000,h2:7001`` (``client=redis-py`` in a ``redis://`` URL:
        redis-py's client instead of the lean one).

        ``timeout`` (seconds) bounds connecting and every reply (on a cluster, each
        call as a whole, retries during a slot migration included); past it, or with
        Redis down, ``on_backend_error`` decides: ``"allow"`` (default) or
        ``"deny"``, or a mapping of metric to either (unlisted metrics allow).
        ``max_connections`` caps the async calls in flight through redis-py's clients
        and ``memory://`` (the lean client multiplexes one connection per event loop).
        ``reservation_ttl`` (seconds, default 15 minutes) is how long a reservation
        holds its estimate unless ``reserve(..., ttl=)`` says otherwise.
        A URL the client cannot use raises :class:`InvalidUsage` here.
        """
        if not isinstance(catalog, Catalog):
            raise InvalidUsage("catalog must be a Catalog")
        backend = Backend(url, timeout=timeout, max_connections=max_connections)
        breaker = None if backend.cluster else Breaker(timeout, node=node_name(backend.client_url))
        runtime = Runtime(catalog, on_backend_error, breaker)
        backend.watch = runtime.watch  # a Cluster's nodes' breakers, made as they are used
        calls = Calls(
            unavailable=runtime.unavailable,
            plans=plans,
            default_plan=default_plan,
            catalog=catalog,
            clock=clock,
            prefix=prefix,
            history_months=history_months,
            reservation_ttl=reservation_ttl,
        )
        return cls(calls, runtime, backend)

    @property
    def aio(self) -> AsyncUsageGuard:
        if self._aio is None:
            from .aio import AsyncUsageGuard

            self._aio = AsyncUsageGuard(self.calls, self.runtime, self.backend, sync=self)
        return self._aio

    @property
    def catalog(self) -> Catalog:
        return self.calls.catalog

    @property
    def failures(self) -> Failures:
        """The live counters behind :meth:`stats` (``backend_errors``, ``unexpected_errors``,
        ``unsettled``, ``dropped_events``): read :meth:`stats` instead."""
        return self.runtime.failures

    def stats(self) -> Stats:
        """A snapshot of what went wrong with Redis so far: errors (by exception class
        too), settles given up, threshold events dropped, each node's breaker, the
        queues. Shared with ``guard.aio``."""
        return self.runtime.stats(self.settler.pending, self.calls.plan_refreshes)

    def observe(self, observer: ObserverT) -> ObserverT:
        """Install an :class:`~usage_guard.Observer` (for both twins): it hears every
        decision, Redis call, error, breaker change and threshold, never an org or a
        user (``usage_guard.otel.OpenTelemetryObserver`` for OpenTelemetry). One that
        raises is logged, never raised."""
        self.runtime.observe(observer)
        return observer

    def _run(self, call: Call[T], *, record: bool = True) -> T:
        """One round trip; ``record=False``: a failure is not counted nor logged (the
        settler's retries: ``backend_errors`` counts what the policy answered)."""
        failures_before = self.runtime.failures.backend_errors
        sent = None
        try:
            for tries_left in range(PLAN_TRIES - 1, -1, -1):
                wait = self.runtime.admit(call, self.backend.timeout)
                if self.runtime.observer is not None:  # the one check when none is
                    sent = time.perf_counter()
                reply = self.backend.sync().run(
                    call.script, call.keys, call.args, wait, call.deadline_arg
                )
                if call.planned_for is None or reply[0] != STALE_PLAN:
                    break
                call = self.calls.replanned(call, reply[1], tries_left)
        except Exception as error:  # what it means is for the error table to say
            return self.runtime.failed(call, error, sent, record=record)
        return self.runtime.completed(call, reply, failures_before, sent)

    # -- metering ---------------------------------------------------------------------

    @overload
    def consume(
        self,
        org: str,
        metric: str,
        amount: int = 1,
        *,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> Decision: ...
    @overload
    def consume(
        self,
        org: str,
        metric: Amounts,
        *,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> Decision: ...
    def consume(
        self,
        org: str,
        metric: str | Amounts,
        amount: int = 1,
        *,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> Decision:
        """Count ``amount`` of ``metric`` (or every amount of a mapping, all or nothing)
        if it fits the org limit and the user's personal budget."""
        return self._run(
            self.calls.consume(org, metric, amount, user=user, idempotency_key=idempotency_key)
        )

    @overload
    def check(
        self, org: str, metric: str, amount: int = 1, *, user: str | None = None
    ) -> Decision: ...
    @overload
    def check(self, org: str, metric: Amounts, *, user: str | None = None) -> Decision: ...
    def check(
        self, org: str, metric: str | Amounts, amount: int = 1, *, user: str | None = None
    ) -> Decision:
        """The decision ``consume`` would take, counting nothing."""
        return self._run(self.calls.consume(org, metric, amount, user=user, check=True))

    @overload
    def reserve(
        self,
        org: str,
        metric: str,
        amount: int = 1,
        *,
        user: str | None = None,
        ttl: float | None = None,
    ) -> Reservation: ...
    @overload
    def reserve(
        self, org: str, metric: Amounts, *, user: str | None = None, ttl: float | None = None
    ) -> Reservation: ...
    def reserve(
        self,
        org: str,
        metric: str | Amounts,
        amount: int = 1,
        *,
        user: str | None = None,
        ttl: float | None = None,
    ) -> Reservation:
        """Count an estimate now; ``settle(actual)`` or ``cancel()`` it within ``ttl``
        seconds (default: the guard's ``reservation_ttl``), after which it is refunded."""
        call, ticket = self.calls.reserve(org, metric, amount, user=user, ttl=ttl)
        decision = self._run(call)
        return Reservation(self, decision, ticket)

    @overload
    def release(self, org: str, metric: str, amount: int = 1) -> None: ...
    @overload
    def release(self, org: str, metric: Amounts) -> None: ...
    def release(self, org: str, metric: str | Amounts, amount: int = 1) -> None:
        """Lower a cumulative metric (never below 0); unchecked."""
        self._run(self.calls.adjust(org, metric, amount, "release"))

    def set_usage(self, org: str, metric: str, value: int) -> None:
        """Reconcile a cumulative metric to ``value``; unchecked."""
        self._run(self.calls.adjust(org, metric, value, "set"))

    # -- administration -----------------------------------------------------------------

    def assign_plan(self, org: str, plan: str | None) -> None:
        """Put an org on a configured plan (``None``: the default plan); clears its overrides."""
        self._run(self.calls.assign_plan(org, plan))

    def set_limit(self, org: str, metric: str, limit: int | None) -> None:
        """Override one limit for one org (``None``: unlimited)."""
        self._run(self.calls.set_limit(org, metric, limit))

    def remove_limit(self, org: str, metric: str) -> None:
        """Drop an override: the org's plan decides again."""
        self._run(self.calls.remove_limit(org, metric))

    def set_budget(self, org: str, user: str, metric: str, budget: int | None) -> None:
        """A user's monthly personal budget of a personal metric (``None`` removes it)."""
        self._run(self.calls.set_budget(org, user, metric, budget))

    def on_threshold(self, listener: Listener) -> Listener:
        """Call ``listener(event)`` when an org meter first reaches 80, 90 or 100 % in a period.

        Usable as a decorator; exceptions in listeners are logged, never raised.
        """
        self.runtime.listeners.append(listener)
        return listener

    def metered(
        self, metric: str, amount: Amount = 1, *, cost: Cost | None = None, ttl: float | None = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """``@guard.metered("emails")``: :func:`usage_guard.metered` on this guard; the
        decorated function keeps its signature."""
        from .decorator import metered

        return metered(metric, amount, cost=cost, ttl=ttl, guard=self)

    def require(self, metric: str, amount: int = 1) -> Requirement:
        """FastAPI: ``Depends(guard.require("ai_tokens", 1))`` meters the route."""
        from .requirement import Requirement

        return Requirement(metric, amount, guard=self)

    def ping(self) -> Health:
        """Connect, authenticate and load the scripts; report what could lose counters.

        Raises :class:`BackendMisconfigured` (credentials, ACL, TLS) or
        :class:`BackendUnavailable`; warns (``Health.warnings`` and a logged
        WARNING) when Redis may evict counters or keeps none on disk.
        """
        replies: list[Any] = []
        for probe in PROBES:
            try:
                replies.append(self.backend.sync().command(*probe.args))
            except Exception as error:  # building the client included: assess() reads it
                replies.append(error)
            if probe.stops(replies[-1]):
                break
        return assess(self.backend.url, replies)

    # -- reading ------------------------------------------------------------------------

    def usage(self, org: str, user: str | None = None) -> Usage:
        """Every meter of an org (and a user's personal meters), with history: one round trip."""
        return self._run(self.calls.usage(org, user))

    def members(self, org: str, top: int = 20) -> dict[str, tuple[MemberUsage, ...]]:
        """Per personal metric, the ``top`` members by use this period, with their budgets
        (None: the shared pool): one round trip whatever the team's size."""
        return self._run(self.calls.members(org, top))

    def report(self, org: str, user: str | None = None) -> Report:
        """The Usage page's data (``.to_dict()`` is its JSON): one round trip."""
        return Report.from_usage(self.usage(org, user), self.catalog)

    def _refund(self, org: str, amounts: Amounts, user: str | None, admitted: Decision) -> None:
        """Take back what a request that was refused after all had counted (a 429 or 503
        answered from inside the app). During an outage it stays counted (logged)."""
        if admitted.scope != "unavailable":  # else nothing was counted
            with contextlib.suppress(BackendUnavailable):
                self._run(self.calls.refund(org, amounts, user, admitted))

    def _owe(self, org: str, amounts: Amounts, user: str | None) -> None:
        """Count what a request served by the outage policy consumed, in the background
        until Redis answers (see :meth:`Calls.owed`): its own consumption, if it ran
        late, counted nothing."""
        self.settler.defer(self.calls.owed(org, amounts, user))

    def _settle(self, call: Call[bool]) -> bool:
        try:
            return self._run(call)
        except (BackendUnavailable, CorruptedCounter) as failure:
            return self.settler.failed(call, failure)

    def close(self, *, timeout: float = 5.0) -> None:
        """Close the connections, after up to ``timeout`` seconds for settles that still
        wait for Redis (what is left then is logged and counted) and threshold events
        that still wait for their listeners."""
        self._drain(timeout)
        self.backend.close()

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.settler.drain(timeout)
        self.runtime.events.drain(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> UsageGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

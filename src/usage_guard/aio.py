"""AsyncUsageGuard: the same calls as UsageGuard, each one awaited round trip."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .calls import PLAN_TRIES, STALE_PLAN, Amounts, Call, Calls
from .catalog import Catalog
from .decision import Decision
from .errors import BackendUnavailable, CorruptedCounter
from .failures import Failures
from .health import PROBES, Health, assess
from .listeners import Listener
from .observe import Observer, Stats
from .report import Report
from .reservations import AsyncReservation
from .runtime import Runtime
from .storage import Backend
from .usage import MemberUsage, Usage

if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Unpack

    from .decorator import Amount, Cost, P, R
    from .guard import GuardOptions, UsageGuard
    from .requirement import Requirement

T = TypeVar("T")
ObserverT = TypeVar("ObserverT", bound=Observer)
logger = logging.getLogger("usage_guard")


class AsyncUsageGuard:
    """The asyncio twin of :class:`~usage_guard.UsageGuard`: the same methods as coroutines.

    Get one as ``UsageGuard.from_url(...).aio`` or ``AsyncUsageGuard.from_url(...)``
    (same arguments); ``aguard.sync`` is the blocking twin.
    """

    def __init__(
        self, calls: Calls, runtime: Runtime, backend: Backend, *, sync: UsageGuard
    ) -> None:
        self.calls = calls
        self.runtime = runtime
        self.backend = backend
        self.sync = sync

    @classmethod
    def from_url(cls, url: str = "memory://", **options: Unpack[GuardOptions]) -> AsyncUsageGuard:
        """``UsageGuard.from_url(url, **options).aio``: the same options."""
        from .guard import UsageGuard

        return UsageGuard.from_url(url, **options).aio

    @property
    def aio(self) -> AsyncUsageGuard:
        return self

    @property
    def catalog(self) -> Catalog:
        return self.calls.catalog

    @property
    def failures(self) -> Failures:
        """The :attr:`UsageGuard.failures <usage_guard.UsageGuard.failures>` both twins share."""
        return self.runtime.failures

    def stats(self) -> Stats:
        """:meth:`UsageGuard.stats <usage_guard.UsageGuard.stats>` (the same, not a coroutine)."""
        return self.sync.stats()

    def observe(self, observer: ObserverT) -> ObserverT:
        """:meth:`UsageGuard.observe <usage_guard.UsageGuard.observe>`: for both twins."""
        self.runtime.observe(observer)
        return observer

    async def _run(self, call: Call[T]) -> T:
        failures_before = self.runtime.failures.backend_errors
        sent = None
        try:
            for tries_left in range(PLAN_TRIES - 1, -1, -1):
                wait = self.runtime.admit(call, self.backend.timeout)
                if self.runtime.observer is not None:  # the one check when none is
                    sent = time.perf_counter()
                reply = await self.backend.aio().run(
                    call.script, call.keys, call.args, wait, call.deadline_arg
                )
                if call.planned_for is None or reply[0] != STALE_PLAN:
                    break
                call = self.calls.replanned(call, reply[1], tries_left)
        except Exception as error:  # what it means is for the error table to say
            return self.runtime.failed(call, error, sent)
        return self.runtime.completed(call, reply, failures_before, sent)

    @overload
    async def consume(
        self,
        org: str,
        metric: str,
        amount: int = 1,
        *,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> Decision: ...
    @overload
    async def consume(
        self,
        org: str,
        metric: Amounts,
        *,
        user: str | None = None,
        idempotency_key: str | None = None,
    ) -> Decision: ...
    async def consume(
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
        return await self._run(
            self.calls.consume(org, metric, amount, user=user, idempotency_key=idempotency_key)
        )

    @overload
    async def check(
        self, org: str, metric: str, amount: int = 1, *, user: str | None = None
    ) -> Decision: ...
    @overload
    async def check(self, org: str, metric: Amounts, *, user: str | None = None) -> Decision: ...
    async def check(
        self, org: str, metric: str | Amounts, amount: int = 1, *, user: str | None = None
    ) -> Decision:
        """The decision ``consume`` would take, counting nothing."""
        return await self._run(self.calls.consume(org, metric, amount, user=user, check=True))

    @overload
    async def reserve(
        self,
        org: str,
        metric: str,
        amount: int = 1,
        *,
        user: str | None = None,
        ttl: float | None = None,
    ) -> AsyncReservation: ...
    @overload
    async def reserve(
        self, org: str, metric: Amounts, *, user: str | None = None, ttl: float | None = None
    ) -> AsyncReservation: ...
    async def reserve(
        self,
        org: str,
        metric: str | Amounts,
        amount: int = 1,
        *,
        user: str | None = None,
        ttl: float | None = None,
    ) -> AsyncReservation:
        """Hold an estimate now; ``settle(actual)`` or ``cancel()`` it within ``ttl``
        seconds (default: the guard's ``reservation_ttl``), after which it is refunded."""
        call, ticket = self.calls.reserve(org, metric, amount, user=user, ttl=ttl)
        return AsyncReservation(self, await self._run(call), ticket)

    @overload
    async def release(self, org: str, metric: str, amount: int = 1) -> None: ...
    @overload
    async def release(self, org: str, metric: Amounts) -> None: ...
    async def release(self, org: str, metric: str | Amounts, amount: int = 1) -> None:
        """Lower a cumulative metric (never below 0); unchecked."""
        await self._run(self.calls.adjust(org, metric, amount, "release"))

    async def set_usage(self, org: str, metric: str, value: int) -> None:
        """Reconcile a cumulative metric to ``value``; unchecked."""
        await self._run(self.calls.adjust(org, metric, value, "set"))

    async def assign_plan(self, org: str, plan: str | None) -> None:
        """Put an org on a configured plan (``None``: the default plan); clears its overrides."""
        await self._run(self.calls.assign_plan(org, plan))

    async def set_limit(self, org: str, metric: str, limit: int | None) -> None:
        """Override one limit for one org (``None``: unlimited)."""
        await self._run(self.calls.set_limit(org, metric, limit))

    async def remove_limit(self, org: str, metric: str) -> None:
        """Drop an override: the org's plan decides again."""
        await self._run(self.calls.remove_limit(org, metric))

    async def set_budget(self, org: str, user: str, metric: str, budget: int | None) -> None:
        """A user's monthly personal budget of a personal metric (``None`` removes it)."""
        await self._run(self.calls.set_budget(org, user, metric, budget))

    def on_threshold(self, listener: Listener) -> Listener:
        """Register a listener (sync or async) for both twins."""
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

    async def ping(self) -> Health:
        """The async :meth:`UsageGuard.ping <usage_guard.UsageGuard.ping>`."""
        replies: list[Any] = []
        for probe in PROBES:
            try:
                replies.append(await self.backend.aio().command(*probe.args))
            except Exception as error:  # building the client included: assess() reads it
                replies.append(error)
            if probe.stops(replies[-1]):
                break
        return assess(self.backend.url, replies)

    async def usage(self, org: str, user: str | None = None) -> Usage:
        """Every meter of an org (and a user's personal meters), with history: one round trip."""
        return await self._run(self.calls.usage(org, user))

    async def members(self, org: str, top: int = 20) -> dict[str, tuple[MemberUsage, ...]]:
        """Per personal metric, the ``top`` members by use this period, with their budgets
        (None: the shared pool): one round trip whatever the team's size."""
        return await self._run(self.calls.members(org, top))

    async def report(self, org: str, user: str | None = None) -> Report:
        """The Usage page's data (``.to_dict()`` is its JSON): one round trip."""
        return Report.from_usage(await self.usage(org, user), self.catalog)

    async def _refund(
        self, org: str, amounts: Amounts, user: str | None, admitted: Decision
    ) -> None:
        """The async :meth:`UsageGuard._refund <usage_guard.UsageGuard._refund>`."""
        if admitted.scope != "unavailable":
            with contextlib.suppress(BackendUnavailable):
                await self._run(self.calls.refund(org, amounts, user, admitted))

    async def _settle(self, call: Call[bool]) -> bool:
        try:
            return await self._run(call)
        except (BackendUnavailable, CorruptedCounter) as failure:
            return self.sync.settler.failed(call, failure)

    async def aclose(self, *, timeout: float = 5.0) -> None:
        """Close this event loop's connection, after up to ``timeout`` seconds for settles
        and threshold events still queued (waited for in a thread, not on the loop)."""
        if self.sync.settler.pending or self.runtime.events.pending:
            await asyncio.to_thread(self.sync._drain, timeout)
        await self.backend.aclose()

    async def __aenter__(self) -> AsyncUsageGuard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

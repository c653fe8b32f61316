"""Short-window rate limits a plan declares (``Plan(..., rate_limits={"api_calls": "20/second"})``).

Enforced with the ``limits`` library (moving window) on the guard's own storage:
``limits``' Redis storage on the same server for ``redis://``, ``rediss://`` and
``redis+cluster://`` URLs, its in-process memory storage for ``memory://``.
Which plan an org is on is read from its ``org`` hash and cached briefly.
``limits`` is imported only when a plan declares rate limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .aio import AsyncUsageGuard
from .guard import UsageGuard
from .keys import KeySpace, encode_id
from .problem import Problem, rate_limited

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindow
    from limits.strategies import MovingWindowRateLimiter

#: How long (s) an org's plan assignment is trusted before it is read again.
PLAN_CACHE_SECONDS = 5.0
#: Orgs whose plan is cached at once; past it the cache starts afresh (entries are short-lived).
PLAN_CACHE_SIZE = 10_000


class RateLimits:
    """The short-window limits of every plan of a guard, checked per org and metric.

    ``hit`` (sync) and ``ahit`` (async) count one request against each limit the
    org's plan declares for the metrics and answer the 429 :class:`Problem` of
    the first one exceeded, or ``None``.
    """

    def __init__(self, guard: UsageGuard | AsyncUsageGuard, *, status_code: int = 429) -> None:
        self.guard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        calls = self.guard.calls
        self.status_code = status_code
        self.by_plan: Mapping[str, Mapping[str, list[RateLimitItem]]] = {}
        if any(plan.rate_limits for plan in calls.plans.by_name.values()):
            from limits import parse_many

            self.by_plan = {
                name: {metric: parse_many(text) for metric, text in plan.rate_limits.items()}
                for name, plan in calls.plans.by_name.items()
            }
        backend = self.guard.backend
        # limits names a unix socket redis+unix://.
        url = backend.client_url.replace("unix://", "redis+unix://", 1)
        options: dict[str, Any] = {}
        if not url.startswith("memory://"):
            # The guard's timeout bounds these calls too, and nothing is retried: a retried
            # moving-window hit may count twice.
            options.update(
                key_prefix=f"{calls.prefix}:rl",
                socket_timeout=backend.timeout,
                socket_connect_timeout=backend.timeout,
            )
            self._uri = url
        else:
            self._uri = "memory://"
        self._options = options
        self._sync: MovingWindowRateLimiter | None = None
        self._async: AsyncMovingWindow | None = None
        self._plans: dict[str, tuple[float, str | None]] = {}

    @property
    def configured(self) -> bool:
        return any(self.by_plan.values())

    @classmethod
    def enforced(
        cls, guard: UsageGuard | AsyncUsageGuard, *, status_code: int, enabled: bool | None
    ) -> RateLimits | None:
        """The limits an integration enforces: ``enabled=None`` means when any plan has some."""
        limiter = cls(guard, status_code=status_code)
        return limiter if (limiter.configured if enabled is None else enabled) else None

    def _limits_for(
        self, plan: str | None, metrics: Iterable[str]
    ) -> list[tuple[str, RateLimitItem]]:
        declared = self.by_plan.get(plan or "", {}) if plan else {}
        return [(metric, item) for metric in metrics for item in declared.get(metric, ())]

    def _cached_plan(self, org: str) -> tuple[bool, str | None]:
        cached = self._plans.get(org)
        if cached is not None and cached[0] > time.monotonic():
            return True, cached[1]
        return False, None

    def _remember(self, org: str, assigned: str | None) -> str | None:
        plan = self.guard.calls.plans.effective(org, assigned)
        name = None if plan is None else plan.name
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[org] = (time.monotonic() + PLAN_CACHE_SECONDS, name)
        return name

    def _plan(self, org: str) -> str | None:
        known, plan = self._cached_plan(org)
        if known:
            return plan
        key = KeySpace(self.guard.calls.prefix, org).org
        return self._remember(org, self.guard.backend.sync().command("HGET", key, "plan"))

    async def _aplan(self, org: str) -> str | None:
        known, plan = self._cached_plan(org)
        if known:
            return plan
        key = KeySpace(self.guard.calls.prefix, org).org
        return self._remember(org, await self.guard.backend.aio().command("HGET", key, "plan"))

    def _denied(self, metric: str, item: RateLimitItem, reset_time: float) -> Problem:
        retry_after = max(1, math.ceil(reset_time - time.time()))
        window = item.get_expiry()
        return rate_limited(metric, item.amount, window, retry_after, status=self.status_code)

    def hit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        """The 429 for the first short-window limit exceeded, or None.

        Fails open when Redis cannot be asked: the monthly quota's own
        ``on_backend_error`` policy still decides the request.
        """
        try:
            return self._hit(org, metrics)
        except Exception as error:  # the error table decides what it means
            self.guard.runtime.failures.record(error)
            return None

    async def ahit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        """The async :meth:`hit`."""
        try:
            return await self._ahit(org, metrics)
        except Exception as error:  # the error table decides what it means
            self.guard.runtime.failures.record(error)
            return None

    def _hit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        checks = self._limits_for(self._plan(org), metrics)
        if not checks:
            return None
        if self._sync is None:
            from limits.storage import storage_from_string
            from limits.strategies import MovingWindowRateLimiter

            options = dict(self._options)
            if self._uri != "memory://":
                options["retry"] = Retry(NoBackoff(), 0)
            self._sync = MovingWindowRateLimiter(storage_from_string(self._uri, **options))
        org_id = encode_id(org)
        for metric, item in checks:
            if not self._sync.hit(item, org_id, metric):
                stats = self._sync.get_window_stats(item, org_id, metric)
                return self._denied(metric, item, stats.reset_time)
        return None

    async def _ahit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        checks = self._limits_for(await self._aplan(org), metrics)
        if not checks:
            return None
        if self._async is None:
            from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindow
            from limits.storage import storage_from_string

            options = dict(self._options)
            if self._uri != "memory://":
                options["implementation"] = "redispy"  # limits' default async client is coredis
                options["retry"] = AsyncRetry(NoBackoff(), 0)
            storage = storage_from_string(f"async+{self._uri}", **options)
            self._async = AsyncMovingWindow(storage)
        org_id = encode_id(org)
        for metric, item in checks:
            if not await self._async.hit(item, org_id, metric):
                stats = await self._async.get_window_stats(item, org_id, metric)
                return self._denied(metric, item, stats.reset_time)
        return None

    def close(self) -> None:
        """Close the Redis client of the sync limiter (nothing to do on memory://)."""
        client: Any = getattr(self._sync and self._sync.storage, "storage", None)
        if hasattr(client, "close"):
            client.close()
        self._sync = None

    async def aclose(self) -> None:
        """Close the Redis client of the async limiter (it belongs to the running loop)."""
        bridge = getattr(self._async and self._async.storage, "bridge", None)
        client: Any = getattr(bridge, "storage", None)
        if hasattr(client, "aclose"):
            await client.aclose()
        self._async = None

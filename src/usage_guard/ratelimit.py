"""Short-window rate limits a plan declares (``Plan(..., rate_limits={"api_calls": "20/second"})``).

A moving window per (org, metric, window), checked and counted by one script call
(``lua/ratelimit.lua``) through the guard's own backend: the same client, timeout,
error table and outage counting as every other call, with Redis's clock. The org's
plan is read in that same call. ``limits`` parses the notation, and is imported only
when a plan declares rate limits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .aio import AsyncUsageGuard
from .calls import Call
from .guard import UsageGuard
from .keys import KeySpace
from .problem import Problem, rate_limited
from .replies import Events


class RateLimits:
    """The short-window limits of every plan of a guard, checked per org and metric.

    ``hit`` (sync) and ``ahit`` (async) count one request against each limit the
    org's plan declares for the metrics and answer the 429 :class:`Problem` of
    the first one exceeded, or ``None`` (also when Redis cannot be asked: the
    monthly quota's own ``on_backend_error`` policy then decides the request).
    """

    def __init__(self, guard: UsageGuard | AsyncUsageGuard, *, status_code: int = 429) -> None:
        self.guard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        self.status_code = status_code
        plans = self.guard.calls.plans
        #: Per metric, per window (s): "\n<plan>=<amount>\n..." of the plans declaring it.
        self._limits: dict[str, dict[int, str]] = {}
        if any(plan.rate_limits for plan in plans.by_name.values()):
            from limits import parse_many

            for plan in plans.by_name.values():
                for metric, text in plan.rate_limits.items():
                    windows = self._limits.setdefault(metric, {})
                    for item in parse_many(text):
                        window = item.get_expiry()
                        windows[window] = windows.get(window, "\n") + f"{plan.name}={item.amount}\n"
        self._plans = "\n" + "".join(f"{name}\n" for name in plans.by_name)
        self._default = plans.default or ""

    @property
    def configured(self) -> bool:
        return bool(self._limits)

    @classmethod
    def enforced(
        cls, guard: UsageGuard | AsyncUsageGuard, *, status_code: int, enabled: bool | None
    ) -> RateLimits | None:
        """The limits an integration enforces: ``enabled=None`` means when any plan has some."""
        limiter = cls(guard, status_code=status_code)
        return limiter if (limiter.configured if enabled is None else enabled) else None

    def _call(self, org: str, metrics: Iterable[str]) -> Call[Problem | None] | None:
        """The script call for the limits declared on ``metrics``; None when none is."""
        space = KeySpace.of(self.guard.calls.prefix, org)
        keys = [space.org]
        args: list[str | int] = [self._default, self._plans]
        for metric in metrics:
            for window, amounts in self._limits.get(metric, {}).items():
                keys.append(space.rate(metric, window))
                args += (metric, window * 1000, amounts)
        if len(keys) == 1:
            return None
        return Call("ratelimit", keys, args, self._answer, _fail_open)

    def _answer(self, reply: Any) -> tuple[Problem | None, Events]:
        if not reply:
            return None, ()
        metric, amount, window_ms, wait_ms = reply
        window = window_ms // 1000
        return rate_limited(
            metric, amount, window, max(1, math.ceil(wait_ms / 1000)), status=self.status_code
        ), ()

    def hit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        """The 429 for the first short-window limit exceeded, or None."""
        call = self._call(org, metrics)
        return None if call is None else self.guard._run(call)

    async def ahit(self, org: str, metrics: Iterable[str]) -> Problem | None:
        """The async :meth:`hit`."""
        call = self._call(org, metrics)
        return None if call is None else await self.guard.aio._run(call)


def _fail_open() -> None:
    return None

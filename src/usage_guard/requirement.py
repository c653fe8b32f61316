"""``Depends(require("ai_tokens"))``: a route dependency that meters the current subject.

A plain callable taking Starlette's ``Request`` (which FastAPI's is), so a guard can
hand one out (``guard.require``) without importing FastAPI.
"""

from __future__ import annotations

from starlette.requests import Request

from .aio import AsyncUsageGuard
from .context import AnyGuard, current_guard, current_subject
from .decision import Decision
from .errors import NotBound, Unidentified
from .plans import check_value


class Requirement:
    """A FastAPI dependency consuming ``amount`` of ``metric`` for the current subject."""

    def __init__(self, metric: str, amount: int = 1, *, guard: AnyGuard | None = None) -> None:
        if guard is not None:
            guard.catalog.require(metric)
        check_value(amount)
        self.metric = metric
        self.amount = amount
        self.guard = guard

    async def __call__(self, request: Request) -> Decision:
        guard = self.guard if self.guard is not None else current_guard()
        who = current_subject()
        if guard is None:
            raise NotBound("require() needs guard= or UsageGuardMiddleware (see install())")
        if who is None:
            raise Unidentified("this route needs an identified organization")
        aguard = guard if isinstance(guard, AsyncUsageGuard) else guard.aio
        decision = await aguard.consume(who.org, self.metric, self.amount, user=who.user)
        return decision.raise_for_status()


def require(metric: str, amount: int = 1, *, guard: AnyGuard | None = None) -> Requirement:
    """``Depends(require("ai_tokens", 1))``: meter the route; a denial answers the 429."""
    return Requirement(metric, amount, guard=guard)

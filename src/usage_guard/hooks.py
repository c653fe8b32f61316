"""Metering around a view, for frameworks that call hooks before and after it (Flask, Django).

What :class:`~usage_guard.asgi.UsageGuardMiddleware` does in one ASGI call, split in
three steps: :meth:`RequestHooks.enter` identifies the request, binds its subject for
``@metered`` and counts its metrics provisionally (a denial is answered at once);
:meth:`RequestHooks.leave` takes the count back if the view refused the request after
all, and returns the ``RateLimit`` fields to add; :meth:`RequestHooks.release` unbinds.
``aenter`` and ``aleave`` are the same on the guard's async side.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from contextvars import Token
from dataclasses import dataclass
from typing import Any

from .aio import AsyncUsageGuard
from .context import AnyGuard, Binding, Budget, bind, unbind
from .decision import Decision
from .errors import InvalidIdentifier
from .problem import (
    INVALID_IDENTITY,
    PROBLEM_JSON,
    UNAUTHORIZED,
    AnsweredError,
    Headers,
    Problem,
    answer,
    policy_fields,
    quota_exceeded,
)
from .ratelimit import RateLimits
from .subject import Subject
from .web import ExcludedPaths, Identify, Metering, Rule, checked_status, close_unawaited


@dataclass(slots=True)
class Entered:
    """A request let in: its subject stays bound until :meth:`RequestHooks.release`."""

    token: Token[Binding]
    who: Subject | None
    amounts: Mapping[str, int]
    #: The provisional count, when the request was identified and metered.
    decision: Decision | None = None


class RequestHooks:
    """One application's metering, with the options of the ASGI middleware."""

    def __init__(
        self,
        *,
        guard: AnyGuard,
        identify: Identify,
        meter: str | None = "api_calls",
        amount: int = 1,
        rules: Iterable[Rule] = (),
        exclude: Iterable[str] = (),
        require_identity: bool = False,
        status_code: int = 429,
        ratelimit_headers: bool = True,
        rate_limits: bool | None = None,
    ) -> None:
        #: The guard ``@metered`` finds bound: it takes the side its function needs.
        self.bound = guard
        self.guard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        self.aguard = self.guard.aio
        self.identify = identify
        self.metering = Metering(self.guard.catalog, meter, amount, rules)
        self.exclude = ExcludedPaths(exclude)
        self.require_identity = require_identity
        self.status_code = checked_status(status_code)
        self.ratelimit_headers = ratelimit_headers
        self.rate_limits = RateLimits.enforced(guard, status_code=status_code, enabled=rate_limits)

    def enter(self, request: Any, method: str, path: str) -> Entered | Problem | None:
        """Before the view: ``None`` (an excluded path: nothing to do after it), a
        problem to answer instead of calling it, or the request let in."""
        if path in self.exclude:
            return None
        try:
            who = self.identify(request)
        except InvalidIdentifier:
            return INVALID_IDENTITY
        if inspect.isawaitable(who):
            close_unawaited(who)
            raise TypeError("identify must be a plain function for a sync framework")
        entered = self._bind(who, method, path)
        if not isinstance(entered, Entered) or who is None or not entered.amounts:
            return entered
        try:
            if self.rate_limits is not None:
                limited = self.rate_limits.hit(who.org, entered.amounts)
                if limited is not None:
                    return self._turn_away(entered, limited)
            # Provisional: counted only if the request is served (see leave()).
            call = self.guard.calls.provisional(who.org, entered.amounts, user=who.user)
            decision = self.guard._run(call)
        except InvalidIdentifier:
            return self._turn_away(entered, INVALID_IDENTITY)
        except BaseException:
            self.release(entered)
            raise
        return self._judged(entered, decision)

    async def aenter(self, request: Any, method: str, path: str) -> Entered | Problem | None:
        """:meth:`enter` on the async side; ``identify`` may be async."""
        if path in self.exclude:
            return None
        try:
            who = self.identify(request)
            if inspect.isawaitable(who):
                who = await who
        except InvalidIdentifier:
            return INVALID_IDENTITY
        entered = self._bind(who, method, path)
        if not isinstance(entered, Entered) or who is None or not entered.amounts:
            return entered
        try:
            if self.rate_limits is not None:
                limited = await self.rate_limits.ahit(who.org, entered.amounts)
                if limited is not None:
                    return self._turn_away(entered, limited)
            call = self.guard.calls.provisional(who.org, entered.amounts, user=who.user)
            decision = await self.aguard._run(call)
        except InvalidIdentifier:
            return self._turn_away(entered, INVALID_IDENTITY)
        except BaseException:
            self.release(entered)
            raise
        return self._judged(entered, decision)

    def leave(self, entered: Entered, status: int, media_type: str) -> Headers:
        """After the view answered ``status``: the ``RateLimit`` fields to add, if any."""
        decision, who = entered.decision, entered.who
        if decision is None or who is None:
            return []
        if self._refused_inside(status, media_type):
            self.guard._refund(who.org, entered.amounts, who.user, decision)
            return []
        return self._served(entered, decision, who)

    async def aleave(self, entered: Entered, status: int, media_type: str) -> Headers:
        """:meth:`leave` on the async side."""
        decision, who = entered.decision, entered.who
        if decision is None or who is None:
            return []
        if self._refused_inside(status, media_type):
            await self.aguard._refund(who.org, entered.amounts, who.user, decision)
            return []
        return self._served(entered, decision, who)

    def release(self, entered: Entered) -> None:
        unbind(entered.token)

    def answer(self, error: AnsweredError) -> Problem:
        """The answer to what a view let through (``UsageLimitExceeded`` and its kin)."""
        return answer(error, self.guard.catalog, self.guard.calls.clock(), status=self.status_code)

    def _bind(self, who: Subject | None, method: str, path: str) -> Entered | Problem:
        if who is None and self.require_identity:
            return UNAUTHORIZED
        amounts = self.metering.base if who is None else self.metering.amounts(method, path)
        # Bound for the whole request: metered views find the subject (none: they answer
        # 401), and every call waits within one budget of ``timeout``.
        return Entered(bind(who, self.bound, Budget()), who, amounts)

    def _judged(self, entered: Entered, decision: Decision) -> Entered | Problem:
        if not decision.allowed:
            return self._turn_away(
                entered,
                quota_exceeded(
                    decision, self.guard.catalog, self.guard.calls.clock(), status=self.status_code
                ),
            )
        entered.decision = decision
        return entered

    def _turn_away(self, entered: Entered, problem: Problem) -> Problem:
        self.release(entered)
        return problem

    def _refused_inside(self, status: int, media_type: str) -> bool:
        """Refused inside the view (``@metered``, ``raise_for_status()``): it counts nothing."""
        return status in (self.status_code, 503) and media_type == PROBLEM_JSON

    def _served(self, entered: Entered, decision: Decision, who: Subject) -> Headers:
        if decision.scope == "unavailable":
            # Served by the outage policy: counted once Redis answers.
            self.guard._owe(who.org, entered.amounts, who.user)
        if not self.ratelimit_headers or decision.quota is None:
            return []
        return policy_fields(decision, self.guard.catalog, self.guard.calls.clock())

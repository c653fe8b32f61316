"""UsageGuardMiddleware: pure ASGI metering in front of any ASGI app.

Per identified HTTP request it counts ``api_calls`` (and the metric of a
matching :class:`Rule`) in one script call, answers a denial with the
problem+json of :mod:`usage_guard.problem` without calling the app, binds the
subject and guard for ``@metered`` and turns what the app lets through into the
client's answer: ``UsageLimitExceeded`` the same 429, ``Unidentified`` (metered
code reached without an identity) a 401, ``InvalidUsage`` (a value from the
request the guard rejects) a 422. Websocket and lifespan scopes pass untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .aio import AsyncUsageGuard
from .context import AnyGuard, Budget, bind, unbind
from .decision import Decision
from .errors import InvalidIdentifier, InvalidUsage, Unidentified, UsageLimitExceeded
from .health import at_startup_async
from .problem import (
    INVALID_IDENTITY,
    PROBLEM_JSON,
    UNAUTHORIZED,
    Problem,
    answer,
    quota_exceeded,
    raw_policy_fields,
)
from .ratelimit import RateLimits
from .subject import Subject
from .web import (
    ExcludedPaths,
    Identify,
    Identity,
    Metering,
    Rule,
    checked_status,
    from_headers,
    from_state,
)

__all__ = [
    "ExcludedPaths",
    "Identify",
    "Rule",
    "UsageGuardMiddleware",
    "from_headers",
    "from_state",
]

PROBLEM_JSON_BYTES = PROBLEM_JSON.encode()


class UsageGuardMiddleware:
    """``app.add_middleware(UsageGuardMiddleware, guard=guard, identify=from_headers())``.

    - ``guard``: a :class:`~usage_guard.UsageGuard` or its async twin (the async side is used).
    - ``identify``: ``(request) -> Subject | None`` (sync or async); the helpers
      :class:`from_headers` and :class:`from_state` read the raw scope instead.
    - ``meter``: the metric counted per identified request (``None``: only rules meter).
    - ``rules``: :class:`Rule` s adding a metric per route, counted in the same call.
    - ``exclude``: paths never metered (``/health``; a trailing ``*`` matches a prefix).
    - ``require_identity``: answer 401 instead of passing anonymous requests through.
    - ``ratelimit_headers``: add ``RateLimit-Policy``/``RateLimit`` to admitted responses.
    - ``ping_on_startup``: ``guard.ping()`` when the server starts (lifespan): a
      misconfigured Redis fails start-up, an unavailable one only warns.
    - ``rate_limits``: enforce the plans' short-window limits (default: when any plan has some).
    """

    def __init__(
        self,
        app: ASGIApp,
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
        ping_on_startup: bool = False,
    ) -> None:
        self.app = app
        self.ping_on_startup = ping_on_startup
        self.guard = guard
        self.aguard = guard if isinstance(guard, AsyncUsageGuard) else guard.aio
        self.catalog = self.aguard.catalog
        self.calls = self.aguard.calls
        self.identify = identify
        self._identify_scope: Callable[[Scope], Identity] | None = getattr(
            identify, "from_scope", None
        )
        self.metering = Metering(self.catalog, meter, amount, rules)
        self.exclude = ExcludedPaths(exclude)
        self.require_identity = require_identity
        self.status_code = checked_status(status_code)
        self.ratelimit_headers = ratelimit_headers
        self.rate_limits = RateLimits.enforced(guard, status_code=status_code, enabled=rate_limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.ping_on_startup:
                await self._start_up(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self.exclude:
            await self.app(scope, receive, send)
            return
        try:
            if self._identify_scope is not None:
                who = self._identify_scope(scope)
            else:
                found = self.identify(Request(scope, receive))
                who = await found if inspect.isawaitable(found) else found
        except InvalidIdentifier:
            await _send_problem(INVALID_IDENTITY, send)
            return
        if who is None and self.require_identity:
            await _send_problem(UNAUTHORIZED, send)
            return
        # Bound for the whole request: @metered and require() find the subject (none:
        # they answer 401), and every call waits within one budget of ``timeout``.
        budget = Budget()
        token = bind(who, self.guard, budget)
        try:
            if who is None:
                await self._call_app(scope, receive, send, budget, None, None, self.metering.base)
                return
            decision: Decision | None = None
            try:
                amounts = self.metering.amounts(scope["method"], path)
                if self.rate_limits is not None and amounts:
                    limited = await self.rate_limits.ahit(who.org, amounts)
                    if limited is not None:
                        await _send_problem(limited, send)
                        return
                if amounts:
                    # Provisional: counted only if the request is served (see _call_app).
                    call = self.calls.provisional(who.org, amounts, user=who.user)
                    decision = await self.aguard._run(call)
            except InvalidIdentifier:
                await _send_problem(INVALID_IDENTITY, send)
                return
            if decision is not None and not decision.allowed:
                await _send_problem(self._denial(decision), send)
                return
            await self._call_app(scope, receive, send, budget, who, decision, amounts)
        finally:
            unbind(token)

    def _denial(self, decision: Decision) -> Problem:
        return quota_exceeded(decision, self.catalog, self.calls.clock(), status=self.status_code)

    async def _start_up(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ping Redis as the server starts: a misconfiguration fails start-up, an
        unavailable Redis only warns. The app's own lifespan runs after the ping."""
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                await at_startup_async(self.aguard.ping)
            except Exception as error:  # misconfigured, or a bug: either way, not started
                # A raised exception would read as "lifespan unsupported" to uvicorn, which
                # then starts the app without its own start-up.
                await send({"type": "lifespan.startup.failed", "message": str(error)})
                return
        pending: list[Message] = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _call_app(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        budget: Budget,
        who: Subject | None,
        decision: Decision | None,
        amounts: Mapping[str, int],
    ) -> None:
        """Run the app (the subject is bound); answer what it lets through. A request the
        app refuses with a 429 or 503 problem (``require()``, ``@metered``,
        ``raise_for_status()`` inside it) counts nothing: what was metered is taken back."""
        extra: list[tuple[bytes, bytes]] = []
        if self.ratelimit_headers and decision is not None:
            extra = raw_policy_fields(decision, self.catalog, self.calls.time.timestamp())
        started = refused = False

        async def send_with_fields(message: Message) -> None:
            nonlocal started, refused
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                if (status == self.status_code or status == 503) and _is_problem(message):
                    refused = True  # it names the metric that denied: no fields of ours
                elif extra:
                    message["headers"] = [*message.get("headers", ()), *extra]
            else:
                # A streamed body's next chunk waits within a timeout of its own: a long
                # stream outlives the request's, and its calls then failed as an outage.
                budget.deadline = None
            await send(message)

        try:
            await self.app(scope, receive, send_with_fields)
        except (UsageLimitExceeded, Unidentified, InvalidUsage) as error:
            if started:
                raise
            problem = answer(error, self.catalog, self.calls.clock(), status=self.status_code)
            refused = isinstance(error, UsageLimitExceeded)
            await _send_problem(problem, send)
        if decision is None or who is None:
            return
        if refused:
            await self.aguard._refund(who.org, amounts, who.user, decision)
        elif decision.scope == "unavailable":  # served by the outage policy: counted later
            self.aguard.sync._owe(who.org, amounts, who.user)


def _is_problem(start: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(PROBLEM_JSON_BYTES)
        for name, value in start.get("headers", ())
    )


async def _send_problem(problem: Problem, send: Send) -> None:
    headers = [(name.encode(), value.encode()) for name, value in problem.headers]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": problem.body})

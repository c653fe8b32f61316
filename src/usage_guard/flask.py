"""Flask: ``UsageGuardFlask(app, guard=guard, identify=from_headers())`` or ``init_app``.

Per identified request it counts ``api_calls`` (before the view, a denial
never reaches it), binds the subject for ``@metered`` views, adds the
``RateLimit`` fields to admitted responses and turns ``UsageLimitExceeded``
into the same problem+json answer as the ASGI middleware. Flask is sync, so
the guard's sync side is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import Token
from typing import Any

from flask import Flask, Response, g, request

from .aio import AsyncUsageGuard
from .context import AnyGuard, Binding, bind, unbind
from .decision import Decision
from .errors import InvalidIdentifier, InvalidUsage, Unidentified, UsageLimitExceeded
from .guard import UsageGuard
from .health import at_startup
from .problem import (
    INVALID_IDENTITY,
    PROBLEM_JSON,
    UNAUTHORIZED,
    AnsweredError,
    Problem,
    answer,
    policy_fields,
    quota_exceeded,
)
from .ratelimit import RateLimits
from .subject import Subject
from .web import ExcludedPaths

FlaskIdentify = Callable[[Any], Subject | None]
EXTENSION = "usage_guard"


class UsageGuardFlask:
    """The Flask extension; ``app.extensions["usage_guard"]`` is the instance.

    Options as for :class:`~usage_guard.UsageGuardMiddleware`: ``meter``,
    ``amount``, ``exclude`` (paths, trailing ``*`` for a prefix),
    ``require_identity``, ``status_code``, ``ratelimit_headers``, ``rate_limits``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        guard: AnyGuard,
        identify: FlaskIdentify,
        meter: str | None = "api_calls",
        amount: int = 1,
        exclude: Iterable[str] = (),
        require_identity: bool = False,
        status_code: int = 429,
        ratelimit_headers: bool = True,
        rate_limits: bool | None = None,
        ping_on_startup: bool = False,
    ) -> None:
        self.ping_on_startup = ping_on_startup
        self.guard: UsageGuard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        self.identify = identify
        if meter is not None:
            self.guard.catalog.require(meter)
        self.meter = meter
        self.amount = amount
        self.exclude = ExcludedPaths(exclude)
        self.require_identity = require_identity
        self.status_code = status_code
        self.ratelimit_headers = ratelimit_headers
        self.rate_limits = RateLimits.enforced(
            self.guard, status_code=status_code, enabled=rate_limits
        )
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if app.extensions.get(EXTENSION) is self:
            return
        app.extensions[EXTENSION] = self
        if self.ping_on_startup:
            # A misconfigured Redis stops the app here; an unavailable one only warns.
            at_startup(self.guard.ping)
        app.before_request(self._before)
        app.after_request(self._after)
        app.teardown_request(self._teardown)
        for error in (UsageLimitExceeded, Unidentified, InvalidUsage):
            app.register_error_handler(error, self._answer)

    def _before(self) -> Response | None:
        path = request.path
        if path in self.exclude:
            return None
        try:
            who = self.identify(request)
        except InvalidIdentifier:
            return _response(INVALID_IDENTITY)
        if who is None:
            if self.require_identity:
                return _response(UNAUTHORIZED)
            # Bound without a subject: a metered call then answers 401.
            g.usage_guard_token = bind(None, self.guard)
            return None
        decision: Decision | None = None
        try:
            if self.meter is not None:
                if self.rate_limits is not None:
                    limited = self.rate_limits.hit(who.org, (self.meter,))
                    if limited is not None:
                        return _response(limited)
                decision = self.guard.consume(who.org, self.meter, self.amount, user=who.user)
        except InvalidIdentifier:
            return _response(INVALID_IDENTITY)
        if decision is not None and not decision.allowed:
            return _response(self._problem(decision))
        g.usage_guard_decision, g.usage_guard_subject = decision, who
        g.usage_guard_token = bind(who, self.guard)
        return None

    def _after(self, response: Response) -> Response:
        decision: Decision | None = g.get("usage_guard_decision")
        if (
            decision is not None
            and self.meter is not None
            and response.status_code in (self.status_code, 503)
            and response.mimetype == PROBLEM_JSON
        ):
            # Refused inside the view (@metered, raise_for_status()): it counts nothing.
            who = g.usage_guard_subject
            self.guard._refund(who.org, {self.meter: self.amount}, who.user, decision)
            return response
        # A 429 from a view already names the metric that denied.
        if (
            self.ratelimit_headers
            and decision is not None
            and decision.quota is not None
            and "ratelimit" not in response.headers
        ):
            for name, value in policy_fields(
                decision, self.guard.catalog, self.guard.calls.clock()
            ):
                response.headers[name] = value
        return response

    def _teardown(self, error: BaseException | None) -> None:
        token: Token[Binding] | None = g.pop("usage_guard_token", None)
        if token is not None:
            unbind(token)

    def _answer(self, error: AnsweredError) -> Response:
        now = self.guard.calls.clock()
        return _response(answer(error, self.guard.catalog, now, status=self.status_code))

    def _problem(self, decision: Decision) -> Problem:
        now = self.guard.calls.clock()
        return quota_exceeded(decision, self.guard.catalog, now, status=self.status_code)


def _response(problem: Problem) -> Response:
    return Response(problem.body, status=problem.status, headers=problem.headers)

"""Flask: ``UsageGuardFlask(app, guard=guard, identify=from_headers())`` or ``init_app``.

Per identified request it counts ``api_calls`` and the metric of a matching
:class:`~usage_guard.asgi.Rule` (before the view, a denial never reaches it),
binds the subject for ``@metered`` views, adds the ``RateLimit`` fields to
admitted responses and turns ``UsageLimitExceeded`` into the same problem+json
answer as the ASGI middleware. Flask is sync, so the guard's sync side is used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypedDict

from flask import Flask, Response, g, request

from .aio import AsyncUsageGuard
from .context import AnyGuard, Binding, Budget, bind, unbind
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
from .web import ExcludedPaths, Metering, Rule

if TYPE_CHECKING:
    from typing_extensions import Unpack

FlaskIdentify = Callable[[Any], Subject | None]
EXTENSION = "usage_guard"
#: The ``app.config`` key ``init_app`` reads options from (a mapping, e.g.
#: ``{"guard": guard, "identify": from_headers(), "exclude": ["/health"]}``).
CONFIG_KEY = "USAGE_GUARD"


class FlaskOptions(TypedDict, total=False):
    """The options of :class:`UsageGuardFlask`, as for the ASGI middleware."""

    guard: AnyGuard
    identify: FlaskIdentify
    meter: str | None
    amount: int
    rules: Iterable[Rule]
    exclude: Iterable[str]
    require_identity: bool
    status_code: int
    ratelimit_headers: bool
    rate_limits: bool | None
    ping_on_startup: bool


class UsageGuardFlask:
    """The Flask extension; ``app.extensions["usage_guard"]`` is the instance.

    ``UsageGuardFlask(app, guard=guard, identify=from_headers())``, or, for an
    application factory, ``usage = UsageGuardFlask()`` then ``usage.init_app(app,
    guard=...)``. Options come from the constructor, then ``app.config["USAGE_GUARD"]``,
    then ``init_app`` (the last one wins): ``guard`` and ``identify`` (required),
    ``meter``, ``amount``, ``rules`` (:class:`~usage_guard.asgi.Rule`), ``exclude``
    (paths, trailing ``*`` for a prefix), ``require_identity``, ``status_code``,
    ``ratelimit_headers``, ``rate_limits``, ``ping_on_startup``. Each app keeps its own.
    """

    def __init__(self, app: Flask | None = None, **options: Unpack[FlaskOptions]) -> None:
        self.options = options
        #: The sync guard of the app initialised last.
        self.guard: UsageGuard | None = None
        self._apps: weakref.WeakKeyDictionary[Flask, FlaskMetering] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Unpack[FlaskOptions]) -> None:
        if app.extensions.get(EXTENSION) is self:
            return
        configured = app.config.get(CONFIG_KEY, {})
        if not isinstance(configured, Mapping):
            raise InvalidUsage(f'app.config["{CONFIG_KEY}"] must be a mapping of options')
        settings: dict[str, Any] = {**self.options, **configured, **options}
        unknown = settings.keys() - FlaskOptions.__annotations__.keys()
        if unknown:
            raise InvalidUsage(f"unknown UsageGuardFlask options: {sorted(unknown)}")
        if "guard" not in settings or "identify" not in settings:
            raise InvalidUsage(
                f'UsageGuardFlask needs guard= and identify= (or app.config["{CONFIG_KEY}"])'
            )
        metered = FlaskMetering(**settings)
        self.guard = metered.guard
        self._apps[app] = metered
        app.extensions[EXTENSION] = self
        if metered.ping_on_startup:
            # A misconfigured Redis stops the app here; an unavailable one only warns.
            at_startup(metered.guard.ping)
        app.before_request(metered.before)
        app.after_request(metered.after)
        app.teardown_request(metered.teardown)
        for error in (UsageLimitExceeded, Unidentified, InvalidUsage):
            app.register_error_handler(error, metered.answer)

    def metering(self, app: Flask) -> FlaskMetering:
        """What this extension does for ``app`` (its guard, options and rate limits)."""
        return self._apps[app]


class FlaskMetering:
    """One app's metering: what the ASGI middleware does, on Flask's request hooks."""

    rate_limits: RateLimits | None

    def __init__(
        self,
        *,
        guard: AnyGuard,
        identify: FlaskIdentify,
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
        self.ping_on_startup = ping_on_startup
        self.guard: UsageGuard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        self.identify = identify
        self.metering = Metering(self.guard.catalog, meter, amount, rules)
        self.exclude = ExcludedPaths(exclude)
        self.require_identity = require_identity
        self.status_code = status_code
        self.ratelimit_headers = ratelimit_headers
        self.rate_limits = RateLimits.enforced(
            self.guard, status_code=status_code, enabled=rate_limits
        )

    def before(self) -> Response | None:
        path = request.path
        if path in self.exclude:
            return None
        try:
            who = self.identify(request)
        except InvalidIdentifier:
            return _response(INVALID_IDENTITY)
        if who is None and self.require_identity:
            return _response(UNAUTHORIZED)
        # Bound for the whole request (undone at teardown): metered views find the
        # subject (none: they answer 401), and every call waits within one budget.
        g.usage_guard_token = bind(who, self.guard, Budget())
        if who is None:
            return None
        decision: Decision | None = None
        amounts = self.metering.amounts(request.method, path)
        try:
            if amounts:
                if self.rate_limits is not None:
                    limited = self.rate_limits.hit(who.org, amounts)
                    if limited is not None:
                        return _response(limited)
                # Provisional: counted only if the request is served (see after()).
                calls = self.guard.calls
                if len(amounts) == 1:
                    [(metric, units)] = amounts.items()
                    call = calls.provisional(who.org, metric, units, user=who.user)
                else:
                    call = calls.provisional(who.org, amounts, 1, user=who.user)
                decision = self.guard._run(call)
        except InvalidIdentifier:
            return _response(INVALID_IDENTITY)
        if decision is not None and not decision.allowed:
            return _response(self._problem(decision))
        g.usage_guard_decision, g.usage_guard_subject = decision, who
        g.usage_guard_amounts = amounts
        return None

    def after(self, response: Response) -> Response:
        decision: Decision | None = g.get("usage_guard_decision")
        if (
            decision is not None
            and response.status_code in (self.status_code, 503)
            and response.mimetype == PROBLEM_JSON
        ):
            # Refused inside the view (@metered, raise_for_status()): it counts nothing.
            who = g.usage_guard_subject
            self.guard._refund(who.org, g.usage_guard_amounts, who.user, decision)
            return response
        if decision is not None and decision.scope == "unavailable":
            # Served by the outage policy: counted once Redis answers.
            who = g.usage_guard_subject
            self.guard._owe(who.org, g.usage_guard_amounts, who.user)
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

    def teardown(self, error: BaseException | None) -> None:
        token: Token[Binding] | None = g.pop("usage_guard_token", None)
        if token is not None:
            unbind(token)

    def answer(self, error: AnsweredError) -> Response:
        now = self.guard.calls.clock()
        return _response(answer(error, self.guard.catalog, now, status=self.status_code))

    def _problem(self, decision: Decision) -> Problem:
        now = self.guard.calls.clock()
        return quota_exceeded(decision, self.guard.catalog, now, status=self.status_code)


def _response(problem: Problem) -> Response:
    return Response(problem.body, status=problem.status, headers=problem.headers)

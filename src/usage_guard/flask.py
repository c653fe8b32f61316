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
from typing import TYPE_CHECKING, Any, TypedDict, cast
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, g, request

from .context import AnyGuard, stays_bound
from .errors import InvalidUsage, Unidentified, UsageLimitExceeded
from .guard import UsageGuard
from .health import at_startup
from .hooks import Entered, RequestHooks
from .problem import AnsweredError, Problem
from .subject import Subject
from .web import Rule

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .dashboard.page import IsAdmin

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
            app.register_error_handler(error, metered.error_answer)

    def metering(self, app: Flask) -> FlaskMetering:
        """What this extension does for ``app`` (its guard, options and rate limits)."""
        return self._apps[app]


class FlaskMetering(RequestHooks):
    """One app's metering: :class:`~usage_guard.hooks.RequestHooks` on Flask's request hooks."""

    def __init__(self, *, ping_on_startup: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.ping_on_startup = ping_on_startup

    def before(self) -> Response | None:
        entered = self.enter(request, request.method, request.path)
        if isinstance(entered, Problem):
            return _response(entered)
        if entered is not None:
            g.usage_guard_entered = entered
        return None

    def after(self, response: Response) -> Response:
        entered: Entered | None = g.get("usage_guard_entered")
        if entered is None:
            return response
        fields = self.leave(entered, response.status_code, response.mimetype or "")
        # A 429 from a view already names the metric that denied.
        if fields and "ratelimit" not in response.headers:
            response.headers.extend(fields)
        # A streamed body runs after teardown unbound the request; a file (send_file) is
        # passed through as it is.
        if response.is_streamed and not response.direct_passthrough:
            response.response = stays_bound(cast("Iterable[bytes]", response.response))
        return response

    def teardown(self, error: BaseException | None) -> None:
        entered: Entered | None = g.pop("usage_guard_entered", None)
        if entered is not None:
            self.release(entered)

    def error_answer(self, error: AnsweredError) -> Response:
        return _response(self.answer(error))


def _response(problem: Problem) -> Response:
    return Response(problem.body, status=problem.status, headers=problem.headers)


#: Every method the page answers; it says 405 itself to the ones a route does not take.
_PAGE_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def usage_blueprint(
    guard: AnyGuard,
    *,
    identify: FlaskIdentify,
    is_admin: IsAdmin | None = None,
    title: str = "Usage",
    trusted_origins: Iterable[str] = (),
    name: str = "usage_guard_page",
) -> Blueprint:
    """The Usage page as a blueprint (the ``dashboard`` extra)::

        app.register_blueprint(
            usage_blueprint(guard, identify=identify, is_admin=is_admin),
            url_prefix="/settings/usage",
        )

    The same page, JSON and admin endpoints as :func:`usage_guard.usage_app`
    (:class:`~usage_guard.dashboard.page.UsagePage`), on the guard's sync side:
    ``identify(request)`` and ``is_admin(request, subject)`` are plain functions.
    """
    from .dashboard.page import MAX_BODY, PageRequest, UsagePage

    page = UsagePage(
        guard, identify=identify, is_admin=is_admin, title=title, trusted_origins=trusted_origins
    )
    blueprint = Blueprint(name, __name__)

    @blueprint.route("/", defaults={"path": ""}, methods=_PAGE_METHODS)
    @blueprint.route("/<path:path>", methods=_PAGE_METHODS)
    def usage(path: str) -> Response:
        below = "/" + path
        full = request.script_root + request.path
        answer = page.respond(
            PageRequest(
                method=request.method,
                path=below,
                page=full[: len(full) - len(path)] if path else full,
                headers=request.headers,
                body=_page_body(MAX_BODY),
                native=request,
            )
        )
        return Response(answer.body, status=answer.status, headers=answer.headers)

    return blueprint


def _page_body(limit: int) -> bytes:
    """The page request's body, read no further than ``limit + 1`` bytes (the page then
    answers 413); an HTML form another extension already parsed is encoded again."""
    if request.content_length is not None and request.content_length <= limit:
        body = request.get_data()
    else:  # too large, or chunked
        body = request.stream.read(limit + 1)
    if not body and request.mimetype == "application/x-www-form-urlencoded" and request.form:
        body = urlencode(list(request.form.items(multi=True))).encode()
    return body

"""The Usage page without a framework: request data in, status, headers and body out.

:class:`UsagePage` routes, checks the origin (:mod:`usage_guard.csrf`), parses, calls
the guard and renders; the Starlette app, the Flask blueprint and the Django URLs
only translate their request into a :class:`PageRequest` and its :class:`PageResponse`
back. Its logic is written once, as a generator of the calls it needs made
(``identify``, ``is_admin`` and guard methods): :meth:`UsagePage.respond` makes them
with the sync guard, :meth:`UsagePage.respond_async` with the async one.

Routes, relative to the page (e.g. ``/settings/usage/``):

- ``GET /``: the report of the caller's organization, HTML for browsers
  (``Accept: text/html``), JSON otherwise; ``GET /report.json`` is always JSON.
- Admin only (403 otherwise), always on the caller's own organization:
  ``PUT /plan`` ``{"plan": "pro"}``; ``PUT /limits/{metric}`` ``{"limit": 20000}``
  (``null`` = unlimited), ``DELETE /limits/{metric}``;
  ``PUT /budgets/{user}/{metric}`` ``{"budget": 10000}``, ``DELETE /budgets/{user}/{metric}``.
  The page's forms ``POST`` the same fields to ``/plan``, ``/limits`` and ``/budgets``
  and are redirected back to the page.

Errors are ``application/problem+json``: 400 for an unreadable body, 422 for
values the guard rejects, 401 without an identity, 403 for non-admins and for
cross-site requests, 404 and 405 off the routes, 415 for a body that is neither
JSON nor an HTML form, 503 when Redis cannot be read (an HTML page for a browser).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jinja2

from .. import csrf
from ..aio import AsyncUsageGuard
from ..catalog import DEFAULT_CATALOG, Catalog
from ..errors import BackendUnavailable, InvalidIdentifier, InvalidUsage
from ..guard import UsageGuard
from ..plans import MAX_VALUE
from ..problem import (
    INVALID_IDENTITY,
    OUTAGE_RETRY_AFTER,
    Problem,
    Refused,
    client_error,
    refused,
)
from ..report import Report
from ..subject import Subject
from ..usage import MemberUsage
from ..web import Identify, close_unawaited
from . import charts, formatting

#: ``is_admin(request, subject)``: may the caller change the organization's settings?
IsAdmin = Callable[[Any, Subject], "bool | Awaitable[bool]"]

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters.update(
    quantity=formatting.quantity,
    compact=formatting.compact,
    figure=formatting.figure,
    percent=formatting.percent,
    month=formatting.month,
    day=formatting.day,
    period_range=formatting.period_range,
    resets_in=formatting.resets_in,
)
_TEMPLATES.globals.update(chart=charts.chart)

#: Members an admin sees per personal metric, the heaviest users first.
MEMBERS_TOP = 20
_BODY = "send a JSON object, or an HTML form (application/x-www-form-urlencoded)"
_UNREADABLE = client_error(
    503, "Service unavailable", "usage data is unavailable, try again shortly"
)
#: Redis cannot be read: the page's 503, as a problem (an HTML page for a browser).
UNAVAILABLE = Problem(
    503, [*_UNREADABLE.headers, ("retry-after", str(OUTAGE_RETRY_AFTER))], _UNREADABLE.body
)
_VARY = ("vary", "Accept")
#: The most a request to the page may send: its forms and JSON bodies are a few dozen bytes.
MAX_BODY = 64 * 1024
TOO_LARGE = client_error(413, "Content Too Large", f"send at most {MAX_BODY:,} bytes")


@dataclass(frozen=True)
class PageRequest:
    """What the page needs of a request, whatever the framework."""

    method: str
    #: The path below the page, from ``/``: ``/``, ``/report.json``, ``/limits/emails``.
    path: str
    #: The page's own URL path, with its trailing slash (``/settings/usage/``): where
    #: forms post and redirects land.
    page: str
    headers: csrf.Headers
    #: The body, or its first ``MAX_BODY + 1`` bytes (the page then answers 413).
    body: bytes
    #: The framework's request, handed to ``identify`` and ``is_admin``.
    native: Any
    #: Hidden fields every form of the page carries (Django's CSRF token).
    form_fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PageResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class _Ask:
    """A call :class:`UsagePage` needs made: ``identify``, ``is_admin`` or a guard method."""

    name: str
    args: tuple[Any, ...]


Steps = Generator[_Ask, Any, PageResponse]
_Handler = Callable[["UsagePage", PageRequest, tuple[str, ...]], Steps]
_HOOKS = ("identify", "is_admin")


class UsagePage:
    """The Usage page of the caller's organization, for any framework to serve.

    ``identify(request)`` returns the caller's :class:`~usage_guard.Subject` (or None:
    401) from the application's authentication; ``is_admin(request, subject)``
    (default: nobody) guards the admin endpoints. Both may be async when served by
    :meth:`respond_async`. Requests that change anything must come from the page's
    own origin or one of ``trusted_origins``, or be scripts sending
    ``application/json`` without browser origin headers (:mod:`usage_guard.csrf`).
    """

    def __init__(
        self,
        guard: UsageGuard | AsyncUsageGuard,
        *,
        identify: Identify,
        is_admin: IsAdmin | None = None,
        title: str = "Usage",
        trusted_origins: Iterable[str] = (),
    ) -> None:
        self.guard = guard.sync if isinstance(guard, AsyncUsageGuard) else guard
        self.aguard = self.guard.aio
        self.identify = identify
        self.is_admin = is_admin
        self.title = title
        self.origins = csrf.trusted(trusted_origins)

    def respond(self, request: PageRequest) -> PageResponse:
        """Answer ``request`` with the sync guard; ``identify`` and ``is_admin`` must be sync."""
        steps = self._steps(request)
        try:
            ask = next(steps)
            while True:
                if ask.name in _HOOKS:
                    result = getattr(self, ask.name)(*ask.args)
                    if inspect.isawaitable(result):
                        close_unawaited(result)
                        raise TypeError(f"{ask.name} must be a plain function for a sync framework")
                else:
                    result = getattr(self.guard, ask.name)(*ask.args)
                ask = steps.send(result)
        except StopIteration as finished:
            answer: PageResponse = finished.value
            return answer
        except (Refused, InvalidUsage, BackendUnavailable) as error:
            return self._failed(request, error)

    async def respond_async(self, request: PageRequest) -> PageResponse:
        """Answer ``request`` with the async guard; ``identify`` and ``is_admin`` may be async."""
        steps = self._steps(request)
        try:
            ask = next(steps)
            while True:
                if ask.name in _HOOKS:
                    result = getattr(self, ask.name)(*ask.args)
                    if inspect.isawaitable(result):
                        result = await result
                else:
                    result = await getattr(self.aguard, ask.name)(*ask.args)
                ask = steps.send(result)
        except StopIteration as finished:
            answer: PageResponse = finished.value
            return answer
        except (Refused, InvalidUsage, BackendUnavailable) as error:
            return self._failed(request, error)

    def _failed(self, request: PageRequest, error: Exception) -> PageResponse:
        if isinstance(error, Refused):
            return _problem(error.problem)
        if isinstance(error, InvalidIdentifier):  # as every integration answers it
            return _problem(INVALID_IDENTITY)
        if isinstance(error, InvalidUsage):
            return _problem(client_error(422, "Invalid value", str(error)))
        if request.method in ("GET", "HEAD") and request.path == "/" and _wants_html(request):
            html = _TEMPLATES.get_template("unavailable.html").render(
                title=self.title, retry_after=OUTAGE_RETRY_AFTER
            )
            headers = [("retry-after", str(OUTAGE_RETRY_AFTER)), _VARY]
            return _html(html, status=503, headers=headers)
        return _problem(UNAVAILABLE)

    def _steps(self, request: PageRequest) -> Steps:
        handler, params = _route(request.method, request.path)
        cross_site = csrf.refusal(request.method, request.headers, self.origins)
        if cross_site is not None:
            return _problem(cross_site)
        if len(request.body) > MAX_BODY:
            return _problem(TOO_LARGE)
        return (yield from handler(self, request, params))

    def _caller(self, request: PageRequest) -> Generator[_Ask, Any, Subject]:
        subject = yield _Ask("identify", (request.native,))
        if not isinstance(subject, Subject):
            raise refused(401, "Unauthorized", "sign in to see your organization's usage")
        return subject

    def _administrator(self, request: PageRequest, subject: Subject) -> Generator[_Ask, Any, bool]:
        if self.is_admin is None:
            return False
        return bool((yield _Ask("is_admin", (request.native, subject))))

    def _admin(self, request: PageRequest) -> Generator[_Ask, Any, Subject]:
        subject = yield from self._caller(request)
        if not (yield from self._administrator(request, subject)):
            raise refused(403, "Forbidden", "only an admin of this organization can do this")
        return subject

    def _page(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._caller(request)
        report: Report = yield _Ask("report", (subject.org, subject.user))
        if request.path.strip("/") == "report.json" or not _wants_html(request):
            return _json(report.to_dict(), headers=[_VARY])
        administrator = yield from self._administrator(request, subject)
        members = (yield _Ask("members", (subject.org, MEMBERS_TOP))) if administrator else None
        html = render(
            report,
            members=members,
            title=self.title,
            admin=administrator,
            base=request.page,
            plans=self.guard.calls.plans.names,
            catalog=self.guard.catalog,
            now=self.guard.calls.clock(),
            form_fields=request.form_fields,
        )
        return _html(html, headers=[_VARY])

    def _set_plan(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        body, from_form = _fields(request)
        if "plan" not in body:
            raise refused(422, "Invalid value", "plan is required (null for the default plan)")
        plan = body["plan"]
        if plan == "":
            plan = None
        if plan is not None and not isinstance(plan, str):
            raise refused(422, "Invalid value", "plan must be a plan name or null")
        yield _Ask("assign_plan", (subject.org, plan))
        return _done(request, from_form, {"plan": plan})

    def _put_limit(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        [metric] = params
        body, from_form = _fields(request)
        if "limit" not in body:
            raise refused(422, "Invalid value", "limit is required (null for unlimited)")
        limit = _parse_value(body["limit"], "limit")
        yield _Ask("set_limit", (subject.org, metric, limit))
        return _done(request, from_form, {"metric": metric, "limit": limit})

    def _post_limit(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        body, from_form = _fields(request)
        metric = _text(body, "metric")
        if body.get("action") == "remove":
            yield _Ask("remove_limit", (subject.org, metric))
            return _done(request, from_form, {"metric": metric, "removed": True})
        limit = _parse_value(body.get("limit"), "limit")
        yield _Ask("set_limit", (subject.org, metric, limit))
        return _done(request, from_form, {"metric": metric, "limit": limit})

    def _delete_limit(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        [metric] = params
        yield _Ask("remove_limit", (subject.org, metric))
        return PageResponse(204, [])

    def _put_budget(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        user, metric = params
        body, from_form = _fields(request)
        if "budget" not in body:
            raise refused(422, "Invalid value", "budget is required (null removes it)")
        budget = _parse_value(body["budget"], "budget")
        yield _Ask("set_budget", (subject.org, user, metric, budget))
        return _done(request, from_form, {"user": user, "metric": metric, "budget": budget})

    def _post_budget(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        body, from_form = _fields(request)
        user, metric = _text(body, "user"), _text(body, "metric")
        budget = _parse_value(body.get("budget"), "budget")
        yield _Ask("set_budget", (subject.org, user, metric, budget))
        return _done(request, from_form, {"user": user, "metric": metric, "budget": budget})

    def _delete_budget(self, request: PageRequest, params: tuple[str, ...]) -> Steps:
        subject = yield from self._admin(request)
        user, metric = params
        yield _Ask("set_budget", (subject.org, user, metric, None))
        return PageResponse(204, [])


#: Path segments below the page (``*`` stands for one non-empty segment) and their
#: handlers by method. HEAD is answered as GET; frameworks drop the body.
_ROUTES: dict[tuple[str, ...], dict[str, _Handler]] = {
    (): {"GET": UsagePage._page},
    ("report.json",): {"GET": UsagePage._page},
    ("plan",): {"PUT": UsagePage._set_plan, "POST": UsagePage._set_plan},
    ("limits",): {"POST": UsagePage._post_limit},
    ("limits", "*"): {"PUT": UsagePage._put_limit, "DELETE": UsagePage._delete_limit},
    ("budgets",): {"POST": UsagePage._post_budget},
    ("budgets", "*", "*"): {"PUT": UsagePage._put_budget, "DELETE": UsagePage._delete_budget},
}


def _route(method: str, path: str) -> tuple[_Handler, tuple[str, ...]]:
    segments = tuple(path.strip("/").split("/")) if path.strip("/") else ()
    shape = tuple("*" if i and segment else segment for i, segment in enumerate(segments))
    methods = _ROUTES.get(shape) if "" not in segments else None
    if methods is None:
        raise refused(404, "Not found", "the Usage page has no such address")
    handler = methods.get("GET" if method.upper() == "HEAD" else method.upper())
    if handler is None:
        allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
        raise Refused(
            Problem(
                405,
                [*_METHOD_NOT_ALLOWED.headers, ("allow", allowed)],
                _METHOD_NOT_ALLOWED.body,
            )
        )
    return handler, segments[1:]


_METHOD_NOT_ALLOWED = client_error(
    405, "Method not allowed", "this address does not take that method"
)


def _fields(request: PageRequest) -> tuple[Mapping[str, object], bool]:
    """The request's fields and whether they came from an HTML form."""
    try:
        if csrf.media_type(request.headers) == csrf.FORM:
            fields = parse_qsl(request.body.decode(), keep_blank_values=True)
            return dict(fields), True
        parsed = json.loads(request.body) if request.body else {}
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise refused(400, "Bad request", _BODY) from None
    if not isinstance(parsed, dict):
        raise refused(400, "Bad request", _BODY)
    return parsed, False


def _done(request: PageRequest, from_form: bool, result: Mapping[str, object]) -> PageResponse:
    if from_form:
        # Post/redirect/get: the browser lands back on the refreshed page.
        return PageResponse(303, [("location", request.page)])
    return _json(result)


def _wants_html(request: PageRequest) -> bool:
    """Content negotiation between JSON and HTML; JSON unless HTML is preferred."""
    best = {"application/json": 0.0, "text/html": 0.0}
    for part in (request.headers.get("accept") or "").split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media in best:
            best[media] = max(best[media], quality)
    return best["text/html"] > best["application/json"]


def _parse_value(raw: object, field: str) -> int | None:
    """A limit or budget from JSON (int or null) or a form (digits, or empty for none)."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        text = raw.strip().replace(",", "").replace("_", "")
        # More digits than 2**53-1 has would also exceed int()'s 4,300-digit limit.
        if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(MAX_VALUE)):
            raise refused(422, "Invalid value", f"{field} must be a whole number from 0 to 2**53-1")
        raw = int(text.lstrip("0") or "0")
    if type(raw) is not int or not 0 <= raw <= MAX_VALUE:
        raise refused(422, "Invalid value", f"{field} must be a whole number from 0 to 2**53-1")
    return raw


def _text(body: Mapping[str, object], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise refused(422, "Invalid value", f"{field} must be a non-empty string")
    return value


def _problem(problem: Problem) -> PageResponse:
    return PageResponse(problem.status, list(problem.headers), problem.body)


def _json(content: Mapping[str, object], headers: Iterable[tuple[str, str]] = ()) -> PageResponse:
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return PageResponse(200, [("content-type", "application/json"), *headers], body.encode())


def _html(html: str, *, status: int = 200, headers: list[tuple[str, str]]) -> PageResponse:
    return PageResponse(
        status, [("content-type", "text/html; charset=utf-8"), *headers], html.encode()
    )


def render(
    report: Report,
    *,
    title: str = "Usage",
    admin: bool = False,
    base: str = "/",
    plans: tuple[str, ...] = (),
    catalog: Catalog = DEFAULT_CATALOG,
    now: datetime | None = None,
    members: Mapping[str, tuple[MemberUsage, ...]] | None = None,
    form_fields: Mapping[str, str] | None = None,
) -> str:
    """The Usage page as HTML. ``base`` is the page's path, where the admin forms post;
    ``plans`` and ``catalog`` fill the admin forms' choices; ``now`` (the guard's clock)
    says when monthly meters reset; ``members`` (:meth:`UsageGuard.members`) is the team's
    breakdown an admin sees; ``form_fields`` are hidden fields every form carries."""
    return _TEMPLATES.get_template("usage.html").render(
        report=report,
        title=title,
        admin=admin,
        base=base.rstrip("/"),
        plans=plans,
        catalog=catalog,
        now=now or datetime.now(timezone.utc),
        members=members,
        members_top=MEMBERS_TOP,
        form_fields=form_fields or {},
    )

"""``usage_app(guard, identify=..., is_admin=...)``: the "Settings > Usage" page to mount.

Routes, relative to where the app is mounted (e.g. ``/settings/usage``):

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
cross-site requests (:mod:`usage_guard.csrf`), 415 for a body that is neither
JSON nor an HTML form, 503 when Redis cannot be reached.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import csrf
from ..aio import AsyncUsageGuard
from ..catalog import DEFAULT_CATALOG, Catalog
from ..errors import BackendUnavailable, InvalidUsage
from ..guard import UsageGuard
from ..plans import MAX_VALUE
from ..problem import OUTAGE_RETRY_AFTER, Problem, Refused, client_error, refused
from ..report import Report
from ..subject import Subject
from ..usage import MemberUsage
from ..web import Identify as Identify  # re-exported by usage_guard.dashboard
from . import charts, formatting

IsAdmin = Callable[[Request, Subject], "bool | Awaitable[bool]"]

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


def _response(problem: Problem) -> Response:
    return Response(problem.body, status_code=problem.status, headers=dict(problem.headers))


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _wants_html(request: Request) -> bool:
    """Content negotiation between JSON and HTML; JSON unless HTML is preferred."""
    best = {"application/json": 0.0, "text/html": 0.0}
    for part in request.headers.get("accept", "").split(","):
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
        raw = int(text)
    if type(raw) is not int or not 0 <= raw <= MAX_VALUE:
        raise refused(422, "Invalid value", f"{field} must be a whole number from 0 to 2**53-1")
    return raw


def _text(body: Mapping[str, object], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise refused(422, "Invalid value", f"{field} must be a non-empty string")
    return value


def usage_app(
    guard: UsageGuard | AsyncUsageGuard,
    *,
    identify: Identify,
    is_admin: IsAdmin | None = None,
    title: str = "Usage",
    trusted_origins: Iterable[str] = (),
) -> Starlette:
    """The Usage page of the caller's organization, to mount at e.g. ``/settings/usage``.

    ``identify(request)`` returns the caller's :class:`~usage_guard.Subject` (or
    None: 401) from the application's authentication; ``is_admin(request,
    subject)`` (sync or async; default: nobody) guards the admin endpoints.
    Either kind of guard works; the async side is used.

    Requests that change anything must come from the page's own origin or one of
    ``trusted_origins`` (``["https://app.example.com"]``), or be scripts sending
    ``application/json`` without browser origin headers: see :mod:`usage_guard.csrf`.
    """
    aguard = guard.aio
    origins = csrf.trusted(trusted_origins)

    async def caller(request: Request) -> Subject:
        subject = await _resolve(identify(request))
        if not isinstance(subject, Subject):
            raise refused(401, "Unauthorized", "sign in to see your organization's usage")
        return subject

    async def admin(request: Request) -> Subject:
        subject = await caller(request)
        if is_admin is None or not await _resolve(is_admin(request, subject)):
            raise refused(403, "Forbidden", "only an admin of this organization can do this")
        return subject

    async def body_of(request: Request) -> tuple[Mapping[str, object], bool]:
        """The request's fields and whether they came from an HTML form."""
        raw = await request.body()
        try:
            if csrf.media_type(request.headers) == csrf.FORM:
                # Parsed here: Starlette's request.form() needs python-multipart.
                fields = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=False)
                return dict(fields), True
            parsed = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise refused(400, "Bad request", _BODY) from None
        if not isinstance(parsed, dict):
            raise refused(400, "Bad request", _BODY)
        return parsed, False

    def done(request: Request, from_form: bool, result: Mapping[str, object]) -> Response:
        if from_form:
            # Post/redirect/get: the browser lands back on the refreshed page.
            return RedirectResponse(_page_path(request), status_code=303)
        return JSONResponse(dict(result))

    async def page(request: Request) -> Response:
        subject = await caller(request)
        report = await aguard.report(subject.org, subject.user)
        if request.url.path.endswith(".json") or not _wants_html(request):
            return JSONResponse(report.to_dict(), headers={"Vary": "Accept"})
        administrator = is_admin is not None and bool(await _resolve(is_admin(request, subject)))
        members = await aguard.members(subject.org, MEMBERS_TOP) if administrator else None
        return HTMLResponse(
            render(
                report,
                members=members,
                title=title,
                admin=administrator,
                base=_page_path(request),
                plans=aguard.calls.plans.names,
                catalog=aguard.catalog,
                now=aguard.calls.clock(),
            ),
            headers={"Vary": "Accept"},
        )

    async def set_plan(request: Request) -> Response:
        subject = await admin(request)
        body, from_form = await body_of(request)
        plan = body.get("plan")
        if plan == "":
            plan = None
        if plan is not None and not isinstance(plan, str):
            raise refused(422, "Invalid value", "plan must be a plan name or null")
        await aguard.assign_plan(subject.org, plan)
        return done(request, from_form, {"plan": plan})

    async def put_limit(request: Request) -> Response:
        subject = await admin(request)
        metric = request.path_params["metric"]
        body, from_form = await body_of(request)
        if "limit" not in body:
            raise refused(422, "Invalid value", "limit is required (null for unlimited)")
        limit = _parse_value(body["limit"], "limit")
        await aguard.set_limit(subject.org, metric, limit)
        return done(request, from_form, {"metric": metric, "limit": limit})

    async def post_limit(request: Request) -> Response:
        subject = await admin(request)
        body, from_form = await body_of(request)
        metric = _text(body, "metric")
        if body.get("action") == "remove":
            await aguard.remove_limit(subject.org, metric)
            return done(request, from_form, {"metric": metric, "removed": True})
        limit = _parse_value(body.get("limit"), "limit")
        await aguard.set_limit(subject.org, metric, limit)
        return done(request, from_form, {"metric": metric, "limit": limit})

    async def delete_limit(request: Request) -> Response:
        subject = await admin(request)
        await aguard.remove_limit(subject.org, request.path_params["metric"])
        return Response(status_code=204)

    async def put_budget(request: Request) -> Response:
        subject = await admin(request)
        user, metric = request.path_params["user"], request.path_params["metric"]
        body, from_form = await body_of(request)
        if "budget" not in body:
            raise refused(422, "Invalid value", "budget is required (null removes it)")
        budget = _parse_value(body["budget"], "budget")
        await aguard.set_budget(subject.org, user, metric, budget)
        return done(request, from_form, {"user": user, "metric": metric, "budget": budget})

    async def post_budget(request: Request) -> Response:
        subject = await admin(request)
        body, from_form = await body_of(request)
        user, metric = _text(body, "user"), _text(body, "metric")
        budget = _parse_value(body.get("budget"), "budget")
        await aguard.set_budget(subject.org, user, metric, budget)
        return done(request, from_form, {"user": user, "metric": metric, "budget": budget})

    async def delete_budget(request: Request) -> Response:
        subject = await admin(request)
        user, metric = request.path_params["user"], request.path_params["metric"]
        await aguard.set_budget(subject.org, user, metric, None)
        return Response(status_code=204)

    def problems(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            cross_site = csrf.refusal(request.method, request.headers, origins)
            if cross_site is not None:
                return _response(cross_site)
            try:
                return await handler(request)
            except Refused as refusal:
                return _response(refusal.problem)
            except InvalidUsage as error:
                return _response(client_error(422, "Invalid value", str(error)))
            except BackendUnavailable:
                if (
                    request.method == "GET"
                    and not request.url.path.endswith(".json")
                    and _wants_html(request)
                ):
                    html = _TEMPLATES.get_template("unavailable.html").render(
                        title=title, retry_after=OUTAGE_RETRY_AFTER
                    )
                    headers = {"Retry-After": str(OUTAGE_RETRY_AFTER), "Vary": "Accept"}
                    return HTMLResponse(html, status_code=503, headers=headers)
                return _response(UNAVAILABLE)

        return endpoint

    routes = [
        Route("/", problems(page), methods=["GET"]),
        Route("/report.json", problems(page), methods=["GET"]),
        Route("/plan", problems(set_plan), methods=["PUT", "POST"]),
        Route("/limits", problems(post_limit), methods=["POST"]),
        Route("/limits/{metric}", problems(put_limit), methods=["PUT"]),
        Route("/limits/{metric}", problems(delete_limit), methods=["DELETE"]),
        Route("/budgets", problems(post_budget), methods=["POST"]),
        Route("/budgets/{user}/{metric}", problems(put_budget), methods=["PUT"]),
        Route("/budgets/{user}/{metric}", problems(delete_budget), methods=["DELETE"]),
    ]
    return Starlette(routes=routes)


def _page_path(request: Request) -> str:
    """The page's own path, wherever the app is mounted (the mount sets ``root_path``)."""
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


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
) -> str:
    """The Usage page as HTML. ``base`` is the app's path, where the admin forms post;
    ``plans`` and ``catalog`` fill the admin forms' choices; ``now`` (the guard's clock)
    says when monthly meters reset; ``members`` (:meth:`UsageGuard.members`) is the team's
    breakdown an admin sees."""
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
    )

"""``usage_app(guard, identify=..., is_admin=...)``: the Usage page as a Starlette app to mount.

It serves :class:`~usage_guard.dashboard.page.UsagePage` (routes, errors and the
origin check are described there) with the guard's async side.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..aio import AsyncUsageGuard
from ..guard import UsageGuard
from ..web import Identify as Identify  # re-exported by usage_guard.dashboard
from .page import IsAdmin, PageRequest, UsagePage

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


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
    page = UsagePage(
        guard,
        identify=identify,
        is_admin=is_admin,
        title=title,
        trusted_origins=trusted_origins,
    )

    async def endpoint(request: Request) -> Response:
        answer = await page.respond_async(
            PageRequest(
                method=request.method,
                path="/" + request.path_params["path"],
                # The mount sets root_path: the page's own path, wherever it is mounted.
                page=str(request.scope.get("root_path", "")).rstrip("/") + "/",
                headers=request.headers,
                body=await request.body(),
                native=request,
            )
        )
        return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=_METHODS)])

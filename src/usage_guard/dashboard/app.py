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
from starlette.types import Receive, Scope, Send

from ..aio import AsyncUsageGuard
from ..guard import UsageGuard
from ..web import Identify as Identify  # re-exported by usage_guard.dashboard
from .page import MAX_BODY, IsAdmin, PageRequest, UsagePage


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

    # Every method reaches the page, which answers 405 itself where a route takes none
    # (Starlette would answer a plain-text 405 to any method a function endpoint lacks).
    return Starlette(routes=[Route("/{path:path}", _Endpoint(page))])


class _Endpoint:
    """The page as an ASGI app (so Starlette routes every method to it)."""

    def __init__(self, page: UsagePage) -> None:
        self.page = page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        answer = await self.page.respond_async(
            PageRequest(
                method=request.method,
                path="/" + request.path_params["path"],
                # The mount sets root_path: the page's own path, wherever it is mounted.
                page=str(scope.get("root_path", "")).rstrip("/") + "/",
                headers=request.headers,
                body=await _body(request),
                native=request,
            )
        )
        response = Response(answer.body, status_code=answer.status, headers=dict(answer.headers))
        await response(scope, receive, send)


async def _body(request: Request) -> bytes:
    """The body, read no further than the page needs to tell it is too large."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            break
    return bytes(body)

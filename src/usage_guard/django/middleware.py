"""``usage_guard.django.UsageGuardMiddleware``: metering for sync (WSGI) and async (ASGI) Django.

Per identified request it counts ``api_calls`` (and the metric of a matching
:class:`~usage_guard.asgi.Rule`) before the view, which a denial never reaches;
binds the subject for ``@metered`` views, sync or async; adds the ``RateLimit``
fields to admitted responses; and answers ``UsageLimitExceeded`` from a view with
the same problem+json as every integration (``Unidentified``: 401, ``InvalidUsage``: 422).
Configured by ``settings.USAGE_GUARD`` (:mod:`usage_guard.django.conf`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)

from ..context import astays_bound, stays_bound
from ..errors import InvalidUsage, Unidentified, UsageLimitExceeded
from ..problem import Headers, Problem
from .conf import configuration

GetResponse = Callable[[HttpRequest], Any]


class UsageGuardMiddleware:
    """Add ``"usage_guard.django.UsageGuardMiddleware"`` to ``MIDDLEWARE``, after the
    authentication middleware that ``IDENTIFY`` relies on."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.asynchronous = iscoroutinefunction(get_response)
        configuration()  # a misconfiguration fails as Django builds its handler
        if self.asynchronous:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.asynchronous:
            return self._serve_async(request)
        # Read on each request (a cached call): a test's override_settings takes effect.
        hooks = configuration().hooks
        entered = hooks.enter(request, request.method or "GET", request.path_info)
        if isinstance(entered, Problem):
            return problem_response(entered)
        if entered is None:
            response: HttpResponseBase = self.get_response(request)
            return response
        try:
            response = self.get_response(request)
            _add(response, hooks.leave(entered, response.status_code, _media_type(response)))
            _stream_bound(response)
        finally:
            hooks.release(entered)
        return response

    async def _serve_async(self, request: HttpRequest) -> HttpResponseBase:
        hooks = configuration().async_hooks
        entered = await hooks.aenter(request, request.method or "GET", request.path_info)
        if isinstance(entered, Problem):
            return problem_response(entered)
        if entered is None:
            response: HttpResponseBase = await self.get_response(request)
            return response
        try:
            response = await self.get_response(request)
            status, media_type = response.status_code, _media_type(response)
            _add(response, await hooks.aleave(entered, status, media_type))
            _stream_bound(response)
        finally:
            hooks.release(entered)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view let a refusal through: answer it (Django calls this hook synchronously)."""
        if isinstance(exception, UsageLimitExceeded | Unidentified | InvalidUsage):
            return problem_response(configuration().hooks.answer(exception))
        return None


def problem_response(problem: Problem) -> HttpResponse:
    return HttpResponse(problem.body, status=problem.status, headers=dict(problem.headers))


def _media_type(response: HttpResponseBase) -> str:
    return str(response.get("Content-Type", "")).split(";")[0].strip().lower()


def _stream_bound(response: HttpResponseBase) -> None:
    """A streamed body runs after this middleware unbound the request: it binds again."""
    # A file is sent as it is (sendfile, when the server has it): no code runs in it.
    if isinstance(response, StreamingHttpResponse) and not isinstance(response, FileResponse):
        content = response.streaming_content
        response.streaming_content = (
            astays_bound(content) if response.is_async else stays_bound(content)
        )


def _add(response: HttpResponseBase, fields: Headers) -> None:
    # A 429 from a view already names the metric that denied.
    if fields and "RateLimit" not in response:
        for name, value in fields:
            response[name] = value

"""The test URLconf: the Usage page, and views that meter in the middleware's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path

from usage_guard import UsageGuard, current_subject, metered
from usage_guard.context import current_guard

calls = {"served": 0}


@metered("emails")
def send_email() -> str:
    return "queued"


@metered("emails")
async def send_email_async() -> str:
    return "queued"


def plain(request: HttpRequest) -> HttpResponse:
    calls["served"] += 1
    who = current_subject()
    return JsonResponse({"org": None if who is None else who.org})


def email(request: HttpRequest) -> HttpResponse:
    calls["served"] += 1
    return JsonResponse({"status": send_email()})


async def email_async(request: HttpRequest) -> HttpResponse:
    calls["served"] += 1
    return JsonResponse({"status": await send_email_async()})


def bulk(request: HttpRequest) -> HttpResponse:
    """A view consuming on its own, raising the 429 itself."""
    who = current_subject()
    guard = current_guard()
    assert who is not None and isinstance(guard, UsageGuard)
    guard.consume(who.org, "emails", 1000).raise_for_status()
    return JsonResponse({"status": "sent"})


def stream(request: HttpRequest) -> HttpResponse:
    """Sends an email per chunk, as a body streamed after the view returned."""

    def chunks() -> Iterator[str]:
        for _ in range(2):
            yield send_email() + "\n"

    async def async_chunks() -> AsyncIterator[str]:
        for _ in range(2):
            yield await send_email_async() + "\n"

    asynchronous = request.META.get("wsgi.version") is None  # Django's ASGI handler
    return StreamingHttpResponse(async_chunks() if asynchronous else chunks())


def slow_stream(request: HttpRequest) -> HttpResponse:
    """Chunks apart by more than the guard's timeout (test_streaming.py)."""
    from test_streaming import async_chunks, chunks

    asynchronous = request.META.get("wsgi.version") is None
    return StreamingHttpResponse(async_chunks() if asynchronous else chunks())


urlpatterns = [
    path("stream", stream),
    path("slow-stream", slow_stream),
    path("plain", plain),
    path("email", email),
    path("email-async", email_async),
    path("bulk", bulk),
    path("settings/usage/", include("usage_guard.django.urls")),
]

"""A streamed body meters with the subject bound, however long it streams, under every
integration: each chunk's calls wait within a ``timeout`` of their own, not within what
is left of the request's (which a long stream outlives: its calls then failed as an
outage, counting nothing, though Redis was up)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest

import frameworks
from django_urls import send_email, send_email_async
from usage_guard import Plan, UsageGuard, current_subject, subject
from usage_guard.asgi import from_headers
from usage_guard.context import astays_bound, stays_bound

ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
#: Longer than the guard's timeout below, between two chunks.
PAUSE = 0.3


def chunks() -> Iterator[str]:
    for _ in range(3):
        yield send_email() + "\n"
        time.sleep(PAUSE)


async def async_chunks() -> AsyncIterator[str]:
    for _ in range(3):
        yield await send_email_async() + "\n"
        await asyncio.sleep(PAUSE)


def streaming_app(framework: str, guard: UsageGuard) -> Any:
    if framework == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        from usage_guard import UsageGuardMiddleware

        async def stream(request: Any) -> StreamingResponse:
            return StreamingResponse(async_chunks())

        app = Starlette(routes=[Route("/stream", stream)])
        app.add_middleware(UsageGuardMiddleware, guard=guard, identify=from_headers())
        return app
    from flask import Flask

    from usage_guard.flask import UsageGuardFlask

    flask_app = Flask(__name__)
    UsageGuardFlask(flask_app, guard=guard, identify=from_headers())
    flask_app.get("/stream")(lambda: flask_app.response_class(chunks()))
    return flask_app


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
@pytest.mark.parametrize("framework", frameworks.FRAMEWORKS)
def test_a_stream_longer_than_the_timeout_counts_every_chunk(
    make_guard: Callable[..., UsageGuard],
    serve_stack: Callable[..., httpx2.Client],
    framework: str,
) -> None:
    guard = make_guard(
        plans={"free": Plan("free", {"emails": 10})}, default_plan="free", timeout=0.2
    )
    if framework in frameworks.DJANGO_STACKS:
        setting = {"GUARD": guard, "IDENTIFY": from_headers()}
        client = serve_stack(
            framework,
            guard,
            USAGE_GUARD=setting,
            ROOT_URLCONF="django_urls",
            MIDDLEWARE=["usage_guard.django.UsageGuardMiddleware"],
        )
        response = client.get("/slow-stream", headers=ALICE)
    else:
        client = serve_stack(framework, guard, streaming_app(framework, guard))
        response = client.get("/stream", headers=ALICE)
    assert response.text == "queued\n" * 3
    assert guard.usage("acme").meters["emails"].used == 3
    assert guard.stats().backend_errors == 0


def test_a_stream_keeps_what_it_binds_itself_and_leaks_nothing() -> None:
    """Before: each chunk was bound to the request again (a body charging another org
    inside ``with subject(...)`` charged the request's from its second chunk on), and a
    stream closed early left the request's subject bound in the serving thread."""
    seen: list[str | None] = []

    def body() -> Iterator[str]:
        seen.append(org_now())
        with subject("other"):
            for _ in range(3):
                seen.append(org_now())
                yield "chunk"
        seen.append(org_now())

    with subject("acme"):
        stream = stays_bound(body())
    assert [next(stream), next(stream)] == ["chunk", "chunk"]
    assert current_subject() is None  # the serving thread's own context
    stream.close()  # the client went away: the body's cleanup runs in its context
    assert current_subject() is None
    assert seen == ["acme", "other", "other"]
    with subject("acme"):
        whole = list(stays_bound(body()))
    assert len(whole) == 3 and seen[3:] == ["acme", "other", "other", "other", "acme"]


def test_an_async_stream_keeps_what_it_binds_itself() -> None:
    seen: list[str | None] = []

    async def body() -> AsyncIterator[str]:
        with subject("other"):
            for _ in range(2):
                seen.append(org_now())
                yield "chunk"
        seen.append(org_now())

    async def serve() -> None:
        with subject("acme"):
            stream = astays_bound(body())
        assert current_subject() is None
        assert [chunk async for chunk in stream] == ["chunk", "chunk"]

    asyncio.run(serve())
    assert seen == ["other", "other", "acme"]


def org_now() -> str | None:
    who = current_subject()
    return None if who is None else who.org


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
def test_loops_closed_without_shutdown_in_several_threads_count_every_call(
    make_guard: Callable[..., UsageGuard],
) -> None:
    """Threads forgetting each other's closed loops raced (KeyError, 'dictionary changed
    size during iteration'), answered as an outage: a call served and not counted."""
    import sys
    import threading

    guard = make_guard(plans={"free": Plan("free", {"emails": 10**6})}, default_plan="free")

    def worker() -> None:
        for _ in range(60):
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(guard.aio.consume("acme", "emails", 1))
            finally:
                loop.close()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows within a run
    try:
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert guard.usage("acme").meters["emails"].used == 360
    assert guard.stats().backend_errors == 0 and guard.stats().unexpected_errors == 0


def test_a_file_response_is_sent_as_it_is() -> None:
    """Wrapping its content dropped FileResponse's file_to_stream: no more sendfile."""
    import io

    frameworks.django_setup()
    from django.http import FileResponse

    from usage_guard.django.middleware import _stream_bound

    response = FileResponse(io.BytesIO(b"data"))
    stream = response.file_to_stream
    _stream_bound(response)
    assert response.file_to_stream is stream
    response.close()

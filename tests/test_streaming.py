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
from usage_guard import Plan, UsageGuard, metered
from usage_guard.asgi import from_headers

ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
#: Longer than the guard's timeout below, between two chunks.
PAUSE = 0.3


@metered("emails")
def send_email() -> str:
    return "queued"


@metered("emails")
async def send_email_async() -> str:
    return "queued"


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

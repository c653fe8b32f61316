"""The guarded target of ``http_bench.py``: a bare Starlette route behind UsageGuardMiddleware.

One identified request = one ``api_calls`` consumption = one EVALSHA (async side).
Limits are set so high that nothing is denied, as in the peers of the shared harness.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_guard import Plan, UsageGuard, UsageGuardMiddleware
from usage_guard.asgi import from_headers

guard = UsageGuard.from_url(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    prefix=os.environ.get("USAGE_GUARD_PREFIX", "ugbench"),
    plans={"bench": Plan("bench", {"api_calls": 10**12})},
    default_plan="bench",
)


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = UsageGuardMiddleware(
    Starlette(routes=[Route("/", index)]), guard=guard, identify=from_headers("x-org-id", None)
)

"""The guarded target of ``http_bench.py``: a bare Starlette route behind UsageGuardMiddleware.

One identified request = one ``api_calls`` consumption = one EVALSHA (async side).
``app`` answers with the RateLimit fields (the default), ``app_without_fields`` without.
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


bare = Starlette(routes=[Route("/", index)])
app = UsageGuardMiddleware(bare, guard=guard, identify=from_headers("x-org-id", None))
#: The same guard without the RateLimit fields on admitted responses, which the peers
#: do not send either (slowapi's ``headers_enabled`` is off by default).
app_without_fields = UsageGuardMiddleware(
    bare, guard=guard, identify=from_headers("x-org-id", None), ratelimit_headers=False
)

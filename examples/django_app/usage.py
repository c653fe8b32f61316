"""The example's guard and who a request is.

DEMO ONLY: callers identify with ``X-Org-Id`` / ``X-User-Id`` headers, and a visitor
of the Usage page without them is acme's admin alice. A real project reads
``request.user`` (``await request.auser()`` in an async ``identify``)::

    async def identify(request):
        user = await request.auser()
        if not user.is_authenticated:
            return None
        return Subject(str(user.organization_id), str(user.pk))
"""

from __future__ import annotations

import os

from django.http import HttpRequest

from usage_guard import Plan, Subject, UsageGuard
from usage_guard.asgi import from_headers
from usage_guard.demo import demo_admin, demo_identity

PLANS = {
    "free": Plan(
        "free",
        {"ai_tokens": 50_000, "emails": 100, "contacts": 1_000, "api_calls": 10_000},
    ),
    "pro": Plan(
        "pro",
        {"ai_tokens": 1_000_000, "emails": 20_000, "contacts": 50_000, "api_calls": 1_000_000},
    ),
}

guard = UsageGuard.from_url(
    os.environ.get("USAGE_GUARD_URL", "memory://"),
    prefix=os.environ.get("USAGE_GUARD_PREFIX", "ug"),
    plans=PLANS,
    default_plan="free",
    on_backend_error={"ai_tokens": "deny"},
)

_api_caller = from_headers("x-org-id", "x-user-id")
_page_visitor = demo_identity()
is_admin = demo_admin()


def identify(request: HttpRequest) -> Subject | None:
    if request.path_info.startswith("/settings/usage/"):
        return _page_visitor(request)
    return _api_caller(request)

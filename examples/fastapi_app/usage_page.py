"""The example app's "Settings > Usage" page: ``usage_app`` mounted at ``/settings/usage``.

Identity comes from the ``X-Org-Id`` / ``X-User-Id`` headers and admin rights
from ``X-Admin: 1``. DEMO ONLY: a real application takes both from its own
authentication (session, token) and never trusts client headers for them. So
that a plain browser can open the demo's page, a request without ``X-Org-Id``
is shown the seeded demo organization as its admin (``fallback``; pass
``fallback=None`` to turn that off).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request

from usage_guard import AsyncUsageGuard, Subject, UsageGuard
from usage_guard.dashboard import usage_app

#: The organization and user ``usage-guard demo`` seeds.
DEMO_SUBJECT = Subject("acme", "alice")
MOUNT_PATH = "/settings/usage"


def mount_usage_page(
    app: Starlette,
    guard: UsageGuard | AsyncUsageGuard,
    *,
    fallback: Subject | None = DEMO_SUBJECT,
    path: str = MOUNT_PATH,
) -> None:
    """Mount the Usage page of ``guard`` on ``app`` (FastAPI or Starlette) at ``path``."""

    def identify(request: Request) -> Subject | None:
        org = request.headers.get("x-org-id")
        if org:
            return Subject(org, request.headers.get("x-user-id") or None)
        return fallback

    def is_admin(request: Request, subject: Subject) -> bool:
        if request.headers.get("x-admin") == "1":
            return True
        # The demo's browser visitor (no identity headers) administers the seeded org.
        return fallback is not None and "x-org-id" not in request.headers

    app.mount(path, usage_app(guard, identify=identify, is_admin=is_admin))

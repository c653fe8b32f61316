"""``usage-guard demo``: the Usage page of a seeded organization, on ``memory://``.

The organization ``acme`` is on the ``pro`` plan with six months of history,
personal budgets and meters in every colour, so its Usage page shows everything
the page can show. Seeding runs the guard's own operations under a clock set
to each past month; afterwards the clock is the real one. The app (the page
behind the middleware, and one metered AI endpoint) ships in the package, so
the demo runs from an installed wheel (the ``demo`` extra: jinja2, uvicorn).

Identity comes from ``X-Org-Id`` / ``X-User-Id`` headers and admin rights from
``X-Admin: 1``. DEMO ONLY: a real application takes both from its own
authentication and never trusts client headers for them. So that a plain
browser can open the page, a request without ``X-Org-Id`` acts as the seeded
organization's user ``alice``, an admin.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .aio import AsyncUsageGuard
from .asgi import UsageGuardMiddleware
from .context import current_subject
from .errors import InvalidUsage
from .guard import UsageGuard
from .periods import Period, utc_now
from .plans import Plan
from .subject import Subject
from .web import from_headers

#: The seeded organization and user: who a request without identity headers acts as.
DEMO_ORG = "acme"
DEMO_USER = "alice"
DEMO_SUBJECT = Subject(DEMO_ORG, DEMO_USER)
MOUNT_PATH = "/settings/usage/"

DEMO_PLANS = {
    "free": Plan(
        "free",
        {
            "users": 3,
            "contacts": 1_000,
            "companies": 500,
            "storage": 1_000_000_000,
            "emails": 500,
            "ai_tokens": 50_000,
            "enrichments": 50,
            "workflow_executions": 100,
            "import_rows": 1_000,
            "export_rows": 1_000,
            "lead_captures": 100,
            "api_calls": 10_000,
        },
    ),
    "pro": Plan(
        "pro",
        {
            "users": 25,
            "contacts": 10_000,
            "companies": 5_000,
            "storage": 10_000_000_000,
            "emails": 20_000,
            "ai_tokens": 1_000_000,
            "enrichments": 2_000,
            "workflow_executions": 5_000,
            "import_rows": 50_000,
            "export_rows": 50_000,
            "lead_captures": 2_000,
            "api_calls": None,
        },
    ),
}

#: This month's organization totals: every colour (blue, yellow, orange, red), a soft cap
#: over 100 % (contacts) and an unlimited meter (API calls on ``pro``).
CURRENT = {
    "users": 12,
    "contacts": 10_420,
    "companies": 4_180,
    "storage": 3_400_000_000,
    "emails": 18_350,
    "ai_tokens": 850_000,
    "enrichments": 2_000,
    "workflow_executions": 1_240,
    "import_rows": 12_500,
    "export_rows": 46_000,
    "lead_captures": 860,
    "api_calls": 48_210,
}
#: Each earlier month as a share of this one, oldest first: a growing team...
TREND = (0.42, 0.51, 0.58, 0.66, 0.79)
#: ...except for meters that look like a real org's do: a dip (a holiday month), a
#: flat one, and a feature the org took up two months ago.
TRENDS = {
    "emails": (0.61, 0.74, 0.52, 0.69, 0.88),
    "storage": (0.97, 0.98, 0.98, 0.99, 1.0),
    "workflow_executions": (0.0, 0.0, 0.0, 0.35, 0.71),
}
#: How this month's personal metrics split between users; the rest is everyone else's.
PERSONAL = {
    "alice": {"ai_tokens": 164_000, "enrichments": 340},
    "bob": {"ai_tokens": 100_000, "enrichments": 120},
}
BUDGETS = {("alice", "ai_tokens"): 200_000, ("bob", "ai_tokens"): 100_000}


class SeedClock:
    """The real clock, or a fixed moment while seeding the past."""

    def __init__(self) -> None:
        self.moment: datetime | None = None

    def __call__(self) -> datetime:
        return self.moment or utc_now()


def seed(guard: UsageGuard, clock: SeedClock, org: str = DEMO_ORG) -> None:
    """Six months of usage for ``org`` on ``pro``; leaves ``clock`` on real time."""
    guard.assign_plan(org, "pro")
    for (user, metric), budget in BUDGETS.items():
        guard.set_budget(org, user, metric, budget)
    now = utc_now()
    current = Period.containing(now)
    months = [current.shift(i - len(TREND)) for i in range(len(TREND))]
    try:
        for index, period in enumerate([*months, current]):
            # Mid-month in the past; now for the current month.
            clock.moment = period.start + timedelta(days=14) if period != current else now
            _seed_month(guard, org, index)
    finally:
        clock.moment = None


def _seed_month(guard: UsageGuard, org: str, index: int) -> None:
    """The ``index``-th of the six months (the last is the current one)."""
    catalog = guard.catalog
    for name, total in CURRENT.items():
        share = (*TRENDS.get(name, TREND), 1.0)[index]
        amount = int(total * share)
        metric = catalog[name]
        if not metric.monthly:
            guard.set_usage(org, name, amount)
            continue
        if metric.personal:
            for user, used in PERSONAL.items():
                mine = int(used[name] * share)
                guard.consume(org, name, mine, user=user).raise_for_status()
                amount -= mine
        guard.consume(org, name, amount).raise_for_status()


def demo_guard(url: str = "memory://usage-guard-demo") -> UsageGuard:
    """A guard with the demo plans and a seeded ``acme`` organization."""
    clock = SeedClock()
    guard = UsageGuard.from_url(url, plans=DEMO_PLANS, default_plan="free", clock=clock)
    seed(guard, clock)
    return guard


class demo_identity(from_headers):
    """``X-Org-Id`` / ``X-User-Id``, else ``fallback`` (the seeded org's ``alice``)."""

    def __init__(self, fallback: Subject | None = DEMO_SUBJECT) -> None:
        super().__init__()
        self.fallback = fallback

    def __call__(self, request: Any) -> Subject | None:
        return super().__call__(request) or self.fallback

    def from_scope(self, scope: Any) -> Subject | None:
        return super().from_scope(scope) or self.fallback


def mount_usage_page(
    app: Starlette,
    guard: UsageGuard | AsyncUsageGuard,
    *,
    fallback: Subject | None = DEMO_SUBJECT,
    path: str = MOUNT_PATH.rstrip("/"),
) -> None:
    """Mount the Usage page of ``guard`` on ``app`` (FastAPI or Starlette) at ``path``,
    with the demo's header identity: ``fallback`` (``None``: no one) administers it."""
    from .dashboard import usage_app

    app.mount(
        path, usage_app(guard, identify=demo_identity(fallback), is_admin=demo_admin(fallback))
    )


def demo_admin(fallback: Subject | None = DEMO_SUBJECT) -> Callable[[Any, Subject], bool]:
    """``is_admin`` of the demo's identity: ``X-Admin: 1``, or the ``fallback`` visitor
    (Starlette, Flask and Django requests alike)."""

    def is_admin(request: Any, subject: Subject) -> bool:
        if request.headers.get("x-admin") == "1":
            return True
        return fallback is not None and "x-org-id" not in request.headers

    return is_admin


def demo_app(guard: UsageGuard) -> Starlette:
    """The demo: ``/`` leads to the Usage page; ``POST /v1/ai/complete?max_tokens=N``
    reserves N AI tokens and settles to the third it "uses" (a 429 once spent) and
    counts one API call."""
    aguard = guard.aio

    async def complete(request: Request) -> Response:
        who = current_subject()
        assert who is not None  # the demo's identity always has one
        try:
            max_tokens = int(request.query_params.get("max_tokens", "256"))
        except ValueError:
            raise InvalidUsage("max_tokens must be an integer") from None
        async with await aguard.reserve(who.org, "ai_tokens", max_tokens, user=who.user) as held:
            held.decision.raise_for_status()
            tokens = max(1, max_tokens // 3)
            await held.settle(tokens)
        return JSONResponse({"text": "A demo completion.", "tokens": tokens})

    async def home(request: Request) -> Response:
        return RedirectResponse(MOUNT_PATH)

    app = Starlette(routes=[Route("/", home), Route("/v1/ai/complete", complete, methods=["POST"])])
    mount_usage_page(app, guard)
    # The page is the product's own UI, not an API call: it is not metered.
    app.add_middleware(
        UsageGuardMiddleware,
        guard=guard,
        identify=demo_identity(),
        exclude=["/", MOUNT_PATH + "*"],
    )
    return app


def run(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Seed, bind the port, print the URL and serve until interrupted.

    The port is bound before the URL is printed, so the URL always works; a busy
    port is a clear message (``--port 0`` picks a free one).
    """
    import uvicorn

    app = demo_app(demo_guard())
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise SystemExit(
            f"usage-guard demo: cannot listen on {host}:{port} ({error.strerror}): "
            "pass another --port (0 picks a free one)"
        ) from None
    port = listener.getsockname()[1]
    print(f"usage_guard demo: organization {DEMO_ORG!r} seeded on memory://", flush=True)
    print(f"Usage page: http://{host}:{port}{MOUNT_PATH}", flush=True)
    print(
        f"JSON:       curl -H 'X-Org-Id: {DEMO_ORG}' -H 'X-User-Id: {DEMO_USER}' "
        f"http://{host}:{port}{MOUNT_PATH}report.json",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[listener])

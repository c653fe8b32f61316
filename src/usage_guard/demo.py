"""``usage-guard demo``: the FastAPI example on ``memory://`` with a seeded organization.

The organization ``acme`` is on the ``pro`` plan with six months of history,
personal budgets and meters in every colour, so its Usage page shows everything
the page can show. Seeding runs the guard's own operations under a clock set
to each past month; afterwards the clock is the real one.
"""

from __future__ import annotations

import importlib
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .guard import UsageGuard
from .periods import Period, utc_now
from .plans import Plan

#: The seeded organization and user (the example's usage_page.DEMO_SUBJECT opens them).
DEMO_ORG = "acme"
DEMO_USER = "alice"
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
#: Each earlier month as a share of this one, oldest first: a growing team.
TREND = (0.42, 0.51, 0.58, 0.66, 0.79)
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
    months = [(current.shift(-len(TREND) + i), share) for i, share in enumerate(TREND)]
    try:
        for period, share in [*months, (current, 1.0)]:
            # Mid-month in the past; now for the current month.
            clock.moment = period.start + timedelta(days=14) if period != current else now
            _seed_month(guard, org, share)
    finally:
        clock.moment = None


def _seed_month(guard: UsageGuard, org: str, share: float) -> None:
    catalog = guard.catalog
    for name, total in CURRENT.items():
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


def demo_app(guard: UsageGuard) -> Any:
    """The FastAPI example app (``examples/fastapi_app``) on ``guard``."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    if not (examples / "fastapi_app" / "app.py").is_file():
        raise SystemExit(
            "usage-guard demo runs examples/fastapi_app/app.py from a source checkout "
            f"(not found under {examples})"
        )
    # The example is not part of the installed package: import it from the checkout.
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
    module = importlib.import_module("fastapi_app.app")
    return module.create_app(guard)


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

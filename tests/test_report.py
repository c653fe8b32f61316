"""The Usage page model (DESIGN.md sections 2 and 5), once per backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from usage_guard import DEFAULT_CATALOG, Plan, UsageGuard
from usage_guard.report import percent_of, status_of

MakeGuard = Callable[..., UsageGuard]

PLANS = {
    "pro": Plan(
        "pro",
        {"emails": 10_000, "contacts": 1_000, "ai_tokens": 100_000, "enrichments": 50},
    )
}
METER_KEYS = {
    "metric",
    "label",
    "category",
    "cap",
    "used",
    "limit",
    "percent",
    "status",
    "resets_at",
    "sparkline",
}


def meter(report: dict[str, Any], metric: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in report["meters"] if m["metric"] == metric]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize(
    ("used", "percent", "status"),
    [
        (7_999, 79.99, "blue"),
        (8_000, 80.0, "yellow"),
        (8_999, 89.99, "yellow"),
        (9_000, 90.0, "orange"),
        (9_999, 99.99, "orange"),
        (10_000, 100.0, "red"),
    ],
)
def test_status_colour_boundaries(
    make_guard: MakeGuard, used: int, percent: float, status: str
) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "emails", used).raise_for_status()
    emails = meter(guard.report("acme").to_dict(), "emails")
    assert (emails["used"], emails["limit"]) == (used, 10_000)
    assert (emails["percent"], emails["status"]) == (percent, status)


def test_110_percent_on_a_soft_cap_is_red_and_over_100(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "contacts", 1_100).raise_for_status()
    contacts = meter(guard.report("acme").to_dict(), "contacts")
    assert contacts["cap"] == "soft"
    assert (contacts["used"], contacts["percent"], contacts["status"]) == (1_100, 110.0, "red")
    assert contacts["resets_at"] is None


def test_soft_cap_between_100_and_110_percent(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "contacts", 1_045).raise_for_status()
    contacts = meter(guard.report("acme").to_dict(), "contacts")
    assert (contacts["percent"], contacts["status"]) == (104.5, "red")


def test_unlimited_meter_is_blue_without_percent(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "api_calls", 123_456)
    api = meter(guard.report("acme").to_dict(), "api_calls")
    assert (api["used"], api["limit"], api["percent"], api["status"]) == (
        123_456,
        None,
        None,
        "blue",
    )


def test_limit_zero_is_red_at_100_percent(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.set_limit("acme", "emails", 0)
    emails = meter(guard.report("acme").to_dict(), "emails")
    assert (emails["used"], emails["limit"], emails["percent"], emails["status"]) == (
        0,
        0,
        100.0,
        "red",
    )


def test_json_shape(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "ai_tokens", 85_000, user="alice").raise_for_status()
    report = guard.report("acme", user="alice").to_dict()
    assert set(report) == {"organization", "plan", "meters", "personal", "history"}
    assert report["organization"] == "acme"
    assert report["plan"] == {
        "name": "pro",
        "period_start": "2026-11-01T00:00:00Z",
        "period_end": "2026-12-01T00:00:00Z",
    }
    assert [m["metric"] for m in report["meters"]] == [m.name for m in DEFAULT_CATALOG]
    assert all(set(m) == METER_KEYS for m in report["meters"])
    assert meter(report, "ai_tokens") == {
        "metric": "ai_tokens",
        "label": "AI tokens",
        "category": "monthly_activity",
        "cap": "hard",
        "used": 85_000,
        "limit": 100_000,
        "percent": 85.0,
        "status": "yellow",
        "resets_at": "2026-12-01T00:00:00Z",
        "sparkline": [0, 0, 0, 0, 0, 85_000],
    }
    # No history at all: no sparkline.
    assert meter(report, "emails")["sparkline"] is None
    assert report["history"]["periods"] == [
        "2026-06",
        "2026-07",
        "2026-08",
        "2026-09",
        "2026-10",
        "2026-11",
    ]
    assert set(report["history"]["series"]) == {m.name for m in DEFAULT_CATALOG}
    assert report["history"]["series"]["ai_tokens"] == [0, 0, 0, 0, 0, 85_000]
    assert all(len(values) == 6 for values in report["history"]["series"].values())


def test_no_plan_reads_as_null(make_guard: MakeGuard) -> None:
    report = make_guard().report("acme").to_dict()
    assert report["plan"]["name"] is None
    assert all(m["limit"] is None and m["status"] == "blue" for m in report["meters"])


def test_personal_budget_versus_shared_pool(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.set_budget("acme", "alice", "ai_tokens", 10_000)
    guard.consume("acme", "ai_tokens", 4_000, user="alice").raise_for_status()
    guard.consume("acme", "ai_tokens", 7_000, user="bob").raise_for_status()
    guard.consume("acme", "enrichments", 3, user="alice").raise_for_status()

    alice = guard.report("acme", user="alice").to_dict()["personal"]
    assert alice == {
        "user": "alice",
        "meters": [
            {
                "metric": "ai_tokens",
                "used": 4_000,
                "budget": 10_000,
                "shared_pool": False,
                "percent": 40.0,
                "status": "blue",
            },
            {
                "metric": "enrichments",
                "used": 3,
                "budget": None,
                "shared_pool": True,
                "percent": None,
                "status": "blue",
            },
        ],
    }
    bob = guard.report("acme", user="bob").to_dict()["personal"]
    assert bob["meters"][0] == {
        "metric": "ai_tokens",
        "used": 7_000,
        "budget": None,
        "shared_pool": True,
        "percent": None,
        "status": "blue",
    }
    # The org meter counts everyone.
    assert meter(guard.report("acme").to_dict(), "ai_tokens")["used"] == 11_000


def test_exhausted_personal_budget_is_red(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.set_budget("acme", "alice", "ai_tokens", 500)
    guard.consume("acme", "ai_tokens", 500, user="alice").raise_for_status()
    mine = guard.report("acme", user="alice").personal
    assert mine is not None
    assert (mine.meters[0].percent, mine.meters[0].status) == (100.0, "red")


def test_personal_is_null_without_a_user(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "ai_tokens", 10, user="alice")
    assert guard.report("acme").to_dict()["personal"] is None


def test_history_across_a_year_boundary(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    clock.set(2026, 11, 30, 23, 59, 59, 999999)
    guard.consume("acme", "emails", 5)
    clock.advance(microseconds=1)  # 2026-12-01T00:00:00Z: a new period
    guard.consume("acme", "emails", 7)
    clock.set(2027, 1, 20)
    guard.consume("acme", "emails", 9)
    clock.set(2027, 2, 3)

    report = guard.report("acme").to_dict()
    assert report["plan"]["period_start"] == "2027-02-01T00:00:00Z"
    assert report["plan"]["period_end"] == "2027-03-01T00:00:00Z"
    assert report["history"]["periods"] == [
        "2026-09",
        "2026-10",
        "2026-11",
        "2026-12",
        "2027-01",
        "2027-02",
    ]
    emails = meter(report, "emails")
    assert report["history"]["series"]["emails"] == [0, 0, 5, 7, 9, 0]
    assert emails["sparkline"] == [0, 0, 5, 7, 9, 0]
    assert (emails["used"], emails["resets_at"]) == (0, "2027-03-01T00:00:00Z")


def test_cumulative_history_is_carried_forward(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    clock.set(2026, 7, 10)
    guard.set_usage("acme", "contacts", 100)
    clock.set(2026, 9, 5)
    guard.consume("acme", "contacts", 20).raise_for_status()
    clock.set(2026, 11, 15, 12)

    report = guard.report("acme").to_dict()
    assert report["history"]["series"]["contacts"] == [0, 100, 100, 120, 120, 120]
    contacts = meter(report, "contacts")
    assert (contacts["used"], contacts["sparkline"]) == (120, [0, 100, 100, 120, 120, 120])


def test_report_is_one_round_trip(make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "emails", 1)
    runner = guard.backend.sync()
    calls: list[str] = []
    original = runner.run

    def counting(script: str, keys: list[str], args: list[str | int], *rest: Any) -> Any:
        calls.append(script)
        return original(script, keys, args, *rest)

    monkeypatch.setattr(runner, "run", counting)
    guard.report("acme", user="alice")
    assert len(calls) == 1


def test_async_twin_reports_the_same(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="pro")
    guard.consume("acme", "ai_tokens", 1_234, user="alice")

    async def read() -> dict[str, Any]:
        try:
            return (await guard.aio.report("acme", user="alice")).to_dict()
        finally:
            await guard.aio.aclose()

    assert asyncio.run(read()) == guard.report("acme", user="alice").to_dict()


def test_percent_rounds_to_two_decimals_and_status_uses_exact_ratio() -> None:
    assert percent_of(1, 3) == 33.33
    assert percent_of(2, 3) == 66.67
    # 79.995 % rounds up for display but has not reached 80 %: still blue.
    assert (percent_of(79_995, 100_000), status_of(79_995, 100_000)) == (80.0, "blue")
    assert (percent_of(5, None), status_of(5, None)) == (None, "blue")

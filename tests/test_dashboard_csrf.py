"""Cross-site requests never change anything on the Usage page, whatever their content type.

Each attack carries the admin's credentials (here the demo's identity headers
stand in for the cookies a browser would attach) and comes from another site.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from starlette.datastructures import Headers

from test_dashboard import ADMIN, identify, is_admin
from usage_guard import InvalidUsage, Plan, UsageGuard
from usage_guard.csrf import refusal, trusted

PLANS = {"free": Plan("free", {"emails": 100}), "pro": Plan("pro", {"emails": 20_000})}
EVIL = "https://evil.example"
APP = "https://app.example.com"


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.assign_plan("acme", "pro")
    guard.set_limit("acme", "emails", 500)
    guard.set_budget("acme", "alice", "ai_tokens", 1_000)
    return guard


@pytest.fixture
def client(guard: UsageGuard, serve_page: Callable[..., httpx2.Client]) -> httpx2.Client:
    """The page under each framework: the rule is the page's own, not the framework's."""
    return serve_page(guard, identify=identify, is_admin=is_admin, trusted_origins=[APP])


def unchanged(guard: UsageGuard) -> bool:
    report = guard.report("acme", user="alice")
    budget = report.personal.meters[0].budget  # type: ignore[union-attr]
    return (report.plan, report.meter("emails").limit, budget) == ("pro", 500, 1_000)


# The four attacks that changed the plan, a limit and a budget before the fix.
ATTACKS = {
    # <form enctype="text/plain"> posting a JSON-looking body: name={"plan":"free","x":"=..."}
    "text/plain form": (
        "POST",
        "/plan",
        {"origin": EVIL, "sec-fetch-site": "cross-site", "content-type": "text/plain"},
        b'{"plan": "free", "x": "="}',
    ),
    # fetch(url, {mode: "no-cors", credentials: "include", method: "POST", body: "..."})
    "no-cors fetch": (
        "POST",
        "/limits",
        {"origin": EVIL, "sec-fetch-site": "cross-site", "content-type": "text/plain"},
        b'{"metric": "emails", "limit": null}',
    ),
    # A Blob body without a type: no content-type at all.
    "body without a content type": (
        "POST",
        "/budgets",
        {"origin": EVIL, "sec-fetch-site": "cross-site"},
        b'{"user": "alice", "metric": "ai_tokens", "budget": null}',
    ),
    # An older browser that sends neither Origin nor Sec-Fetch-Site with a form.
    "form without origin headers": (
        "POST",
        "/plan",
        {"content-type": "application/x-www-form-urlencoded"},
        b"plan=free",
    ),
    "same-site subdomain": (
        "POST",
        "/plan",
        {"sec-fetch-site": "same-site", "content-type": "application/x-www-form-urlencoded"},
        b"plan=free",
    ),
    "sandboxed frame (Origin: null)": (
        "POST",
        "/plan",
        {"origin": "null", "content-type": "application/x-www-form-urlencoded"},
        b"plan=free",
    ),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_cross_site_writes_change_nothing(
    client: httpx2.Client, guard: UsageGuard, attack: str
) -> None:
    method, path, headers, body = ATTACKS[attack]
    response = client.request(
        method, f"/settings/usage{path}", headers={**ADMIN, **headers}, content=body
    )
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert unchanged(guard)


def test_other_content_types_are_415_even_from_the_same_origin(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    same_origin = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    for media in ("text/plain", "multipart/form-data; boundary=x", "application/xml"):
        response = client.put(
            "/settings/usage/plan",
            headers={**ADMIN, **same_origin, "content-type": media},
            content=b'{"plan": "free"}',
        )
        assert response.status_code == 415, media
        assert response.headers["content-type"] == "application/problem+json"
    assert unchanged(guard)


def test_scripts_send_json_and_trusted_origins_are_accepted(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    # A script (no browser headers) with JSON; a DELETE, which browsers never send cross-site
    # without a preflight, needs no body at all.
    assert client.put("/settings/usage/limits/emails", headers=ADMIN, json={"limit": 7}).is_success
    assert guard.report("acme").meter("emails").limit == 7
    assert client.delete("/settings/usage/limits/emails", headers=ADMIN).status_code == 204
    # A trusted front end on another origin, e.g. a single-page app with CORS set up.
    from_app = {**ADMIN, "origin": APP, "sec-fetch-site": "same-site"}
    assert client.put("/settings/usage/plan", headers=from_app, json={"plan": "free"}).is_success
    assert guard.report("acme").plan == "free"
    # Reading is never refused.
    assert client.get("/settings/usage/", headers={**ADMIN, "origin": EVIL}).is_success


def test_the_rule_as_a_table() -> None:
    origins = trusted([APP, "http://LOCALHOST:8000/", "https://api.example.com:443"])
    assert origins == {APP, "http://localhost:8000", "https://api.example.com"}
    form = "application/x-www-form-urlencoded"
    cases = [
        # method, headers, expected status (None: accepted)
        ("GET", {"origin": EVIL}, None),
        ("POST", {"host": "a.test", "origin": "https://a.test", "content-type": form}, None),
        ("POST", {"host": "a.test", "origin": "https://A.test:443", "content-type": form}, None),
        ("POST", {"host": "a.test:443", "origin": "https://a.test", "content-type": form}, None),
        ("POST", {"host": "a.test", "origin": "https://a.test:8443"}, 403),
        ("POST", {"host": "[::1]:8000", "origin": "http://[::1]:8000", "content-type": form}, None),
        # The page's own form under Referrer-Policy: no-referrer.
        ("POST", {"origin": "null", "sec-fetch-site": "same-origin", "content-type": form}, None),
        ("POST", {"origin": "null", "content-type": form}, 403),
        ("POST", {"origin": APP, "sec-fetch-site": "cross-site", "content-type": form}, None),
        ("POST", {"host": "a.test", "origin": APP, "content-type": "application/json"}, None),
        ("POST", {"host": "a.test", "origin": "http://localhost:8000", "content-type": form}, None),
        ("POST", {"sec-fetch-site": "same-origin", "content-type": form}, None),
        ("POST", {"sec-fetch-site": "none", "content-type": form}, None),
        ("POST", {"sec-fetch-site": "cross-site", "content-type": "application/json"}, 403),
        ("POST", {"content-type": "application/json; charset=utf-8"}, None),
        ("POST", {}, 403),
        ("PUT", {"content-type": form, "content-length": "6"}, 403),
        ("DELETE", {}, None),
        ("DELETE", {"sec-fetch-site": "same-origin", "content-type": "text/plain"}, 415),
        ("PATCH", {"sec-fetch-site": "same-origin", "transfer-encoding": "chunked"}, 415),
    ]
    for method, headers, expected in cases:
        refused = refusal(method, Headers(headers), origins)
        assert (refused and refused.status) == expected, (method, headers)


@pytest.mark.parametrize(
    "bad", ["evil.example", "ftp://x", "https://x/path", "https://x?q", "https://x:99999", 7]
)
def test_trusted_origins_are_validated(bad: object) -> None:
    with pytest.raises(InvalidUsage):
        trusted([bad])  # type: ignore[list-item]
    with pytest.raises(InvalidUsage):
        trusted("https://x")

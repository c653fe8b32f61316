"""usage_app over HTTP: JSON and HTML, admin endpoints, isolation, bad input. Per backend."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

import frameworks
import usage_guard.dashboard
from usage_guard import Plan, Subject, UsageGuard, usage_app
from usage_guard.dashboard import formatting

MakeGuard = Callable[..., UsageGuard]

PLANS = {
    "free": Plan("free", {"emails": 100, "ai_tokens": 10_000}),
    "pro": Plan(
        "pro",
        {
            "emails": 20_000,
            "ai_tokens": 1_000_000,
            "contacts": 10_000,
            "storage": 10_000_000_000,
            "enrichments": 2_000,
        },
    ),
}
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
ADMIN = {**ALICE, "x-admin": "1"}
#: What a browser sends with a form posted by the page itself.
BROWSER_FORM = {**ADMIN, "origin": "http://testserver", "sec-fetch-site": "same-origin"}
HTML = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
PROBLEM = "application/problem+json"


def identify(request: Any) -> Subject | None:
    org = request.headers.get("x-org-id")
    return Subject(org, request.headers.get("x-user-id")) if org else None


def is_admin(request: Any, subject: Subject) -> bool:
    return bool(request.headers.get("x-admin") == "1")


def mounted(guard: Any, identify: Any = identify, is_admin: Any = is_admin) -> Starlette:
    app = Starlette()
    app.mount("/settings/usage", usage_app(guard, identify=identify, is_admin=is_admin))
    return app


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.assign_plan("acme", "pro")
    guard.consume("acme", "ai_tokens", 850_000, user="alice").raise_for_status()
    guard.consume("acme", "emails", 18_500).raise_for_status()
    guard.set_usage("acme", "storage", 3_400_000_000)
    guard.set_usage("acme", "contacts", 10_420)
    guard.consume("acme", "enrichments", 2_000).raise_for_status()
    guard.consume("beta", "emails", 7).raise_for_status()
    return guard


@pytest.fixture
def client(guard: UsageGuard, serve_page: Callable[..., httpx2.Client]) -> httpx2.Client:
    """The page under each framework (Starlette, Flask, Django sync and async)."""
    return serve_page(guard, identify=identify, is_admin=is_admin)


def test_json_by_default_and_by_path(client: httpx2.Client, guard: UsageGuard) -> None:
    expected = guard.report("acme", user="alice").to_dict()
    for path, accept in [
        ("/settings/usage/", "application/json"),
        ("/settings/usage/", "*/*"),
        ("/settings/usage/report.json", "text/html"),
    ]:
        response = client.get(path, headers={**ALICE, "accept": accept})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == expected
    assert expected["personal"]["user"] == "alice"
    assert expected["plan"]["name"] == "pro"


def test_html_page_shows_the_four_sections(client: httpx2.Client) -> None:
    response = client.get("/settings/usage/", headers={**ALICE, **HTML})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["vary"] == "Accept"
    page = response.text
    for text in ["Pro plan", "Organization usage", "My Usage", "Usage history"]:
        assert text in page
    for heading in ["Core Limits", "Monthly Activity", "Data Operations"]:
        assert f">{heading}</h3>" in page
    # ai_tokens at 85 %: a yellow bar with its value for assistive technology.
    assert re.search(
        r'data-metric="ai_tokens" data-status="yellow".*?role="progressbar" '
        r'aria-labelledby="label-ai_tokens"\s+aria-valuenow="85.0"',
        page,
        re.S,
    )
    assert 'data-metric="enrichments" data-status="red"' in page
    assert 'data-metric="emails" data-status="orange"' in page
    # Numbers for people.
    assert "850 K" in page and "of 1 M tokens" in page
    assert "3.4 GB" in page and "of 10 GB" in page
    assert "Shared organization pool" in page
    # Sparklines and the four charted metrics, as inline SVG; no script, nothing external.
    assert page.count('class="spark"') >= 5
    assert page.count('<figure class="card chart"') == 4
    assert "<script" not in page and "https://" not in page
    # Viewers get no admin forms.
    assert "<form" not in page


def test_admin_page_has_forms_posting_under_the_mount(client: httpx2.Client) -> None:
    page = client.get("/settings/usage/", headers={**ADMIN, **HTML}).text
    for action in ("/plan", "/limits", "/budgets"):
        assert f'action="/settings/usage{action}"' in page
    assert '<label for="budget-user">' in page


def test_unidentified_callers_get_401(client: httpx2.Client) -> None:
    response = client.get("/settings/usage/")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/plan", {"plan": "free"}),
        ("POST", "/plan", {"plan": "free"}),
        ("PUT", "/limits/emails", {"limit": 1}),
        ("DELETE", "/limits/emails", None),
        ("PUT", "/budgets/alice/ai_tokens", {"budget": 1}),
        ("DELETE", "/budgets/alice/ai_tokens", None),
        ("POST", "/budgets", {"user": "alice", "metric": "ai_tokens", "budget": 1}),
    ],
)
def test_admin_endpoints_refuse_non_admins(
    client: httpx2.Client, guard: UsageGuard, method: str, path: str, body: Any
) -> None:
    before = guard.report("acme", user="alice").to_dict()
    response = client.request(method, "/settings/usage" + path, headers=ALICE, json=body)
    assert response.status_code == 403
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["title"] == "Forbidden"
    assert guard.report("acme", user="alice").to_dict() == before


def test_admin_sets_and_removes_a_budget(client: httpx2.Client, guard: UsageGuard) -> None:
    put = client.put("/settings/usage/budgets/bob/ai_tokens", headers=ADMIN, json={"budget": 5_000})
    assert (put.status_code, put.json()) == (
        200,
        {"user": "bob", "metric": "ai_tokens", "budget": 5_000},
    )
    mine = guard.report("acme", user="bob").to_dict()["personal"]["meters"][0]
    assert (mine["budget"], mine["shared_pool"]) == (5_000, False)
    assert client.delete("/settings/usage/budgets/bob/ai_tokens", headers=ADMIN).status_code == 204
    mine = guard.report("acme", user="bob").to_dict()["personal"]["meters"][0]
    assert (mine["budget"], mine["shared_pool"]) == (None, True)


def test_admin_assigns_plans_and_overrides_limits(client: httpx2.Client, guard: UsageGuard) -> None:
    assert (
        client.put("/settings/usage/plan", headers=ADMIN, json={"plan": "free"}).status_code == 200
    )
    assert guard.report("acme").to_dict()["plan"]["name"] == "free"

    response = client.put("/settings/usage/limits/emails", headers=ADMIN, json={"limit": None})
    assert response.json() == {"metric": "emails", "limit": None}
    assert guard.report("acme").meter("emails").limit is None
    client.put("/settings/usage/limits/emails", headers=ADMIN, json={"limit": 50_000})
    assert guard.report("acme").meter("emails").limit == 50_000
    assert client.delete("/settings/usage/limits/emails", headers=ADMIN).status_code == 204
    assert guard.report("acme").meter("emails").limit == 100  # the free plan's again


def test_html_forms_redirect_back_to_the_page(client: httpx2.Client, guard: UsageGuard) -> None:
    form = {"user": "carol", "metric": "enrichments", "budget": "1,500"}
    response = client.post(
        "/settings/usage/budgets", headers=BROWSER_FORM, data=form, follow_redirects=False
    )
    assert (response.status_code, response.headers["location"]) == (303, "/settings/usage/")
    assert guard.report("acme", user="carol").personal.meters[1].budget == 1_500  # type: ignore[union-attr]

    client.post(
        "/settings/usage/limits", headers=BROWSER_FORM, data={"metric": "emails", "limit": "7"}
    )
    assert guard.report("acme").meter("emails").limit == 7
    client.post(
        "/settings/usage/limits",
        headers=BROWSER_FORM,
        data={"metric": "emails", "action": "remove"},
    )
    assert guard.report("acme").meter("emails").limit == 20_000
    client.post("/settings/usage/plan", headers=BROWSER_FORM, data={"plan": ""})
    assert guard.report("acme").plan == "free"  # the default plan


def test_forms_submitted_by_another_site_are_refused(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    form = {"metric": "emails", "limit": "0"}
    for foreign in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
        refused = client.post("/settings/usage/limits", headers={**ADMIN, **foreign}, data=form)
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
    same_site = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    client.post("/settings/usage/limits", headers={**ADMIN, **same_site}, data=form)
    assert guard.report("acme").meter("emails").limit == 0


def test_callers_only_ever_see_and_change_their_own_org(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    beta_admin = {"x-org-id": "beta", "x-user-id": "mallory", "x-admin": "1"}
    acme_before = guard.report("acme", user="alice").to_dict()

    seen = client.get("/settings/usage/?org=acme", headers=beta_admin).json()
    assert seen["organization"] == "beta"
    assert [m["used"] for m in seen["meters"] if m["metric"] == "emails"] == [7]

    client.put("/settings/usage/budgets/alice/ai_tokens", headers=beta_admin, json={"budget": 1})
    client.put("/settings/usage/plan", headers=beta_admin, json={"plan": "free"})
    client.put("/settings/usage/limits/emails", headers=beta_admin, json={"limit": 0})
    assert guard.report("acme", user="alice").to_dict() == acme_before
    beta = guard.report("beta", user="alice")
    assert beta.meter("emails").limit == 0
    assert beta.personal is not None and beta.personal.meters[0].budget == 1


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("PUT", "/budgets/alice/ai_tokens", {"content": b"{not json"}, 400),
        ("PUT", "/budgets/alice/ai_tokens", {"content": b"\xff\xfe"}, 400),
        ("PUT", "/budgets/alice/ai_tokens", {"json": [1, 2]}, 400),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": "abc"}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": -1}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": True}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": 1.5}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": 2**53}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"json": {"budget": "\u00b2"}}, 422),
        ("PUT", "/budgets/alice/ai_tokens", {"content": b"[" * 60_000}, 400),  # too deep
        ("PUT", "/budgets/alice/ai_tokens", {"content": b'{"budget": 1' + b"0" * 5000 + b"}"}, 400),
        ("PUT", "/budgets/alice/emails", {"json": {"budget": 5}}, 422),
        ("PUT", "/budgets/alice/nope", {"json": {"budget": 5}}, 422),
        ("PUT", "/budgets/" + "u" * 300 + "/ai_tokens", {"json": {"budget": 5}}, 400),
        ("POST", "/budgets", {"data": {"metric": "ai_tokens", "budget": "5"}}, 422),
        ("POST", "/budgets", {"data": {"user": "a", "metric": "ai_tokens", "budget": "x"}}, 422),
        # Past int()'s 4,300-digit limit, which raised outside the checks (a 500).
        (
            "POST",
            "/budgets",
            {"data": {"user": "a", "metric": "ai_tokens", "budget": "9" * 5000}},
            422,
        ),
        ("PUT", "/plan", {"json": {"plan": "platinum"}}, 422),
        ("PUT", "/plan", {"json": {"plan": 3}}, 422),
        # No plan named at all: not a reset to the default plan, which null asks for.
        ("PUT", "/plan", {"json": {}}, 422),
        ("POST", "/plan", {"data": {"planned": "pro"}}, 422),
        ("PUT", "/limits/nope", {"json": {"limit": 5}}, 422),
        ("PUT", "/limits/emails", {"json": {"limit": "lots"}}, 422),
        ("PUT", "/limits/emails", {"json": {}}, 422),
        ("POST", "/limits", {"data": {"limit": "5"}}, 422),
        ("DELETE", "/limits/nope", {}, 422),
    ],
)
def test_bad_input_is_a_problem_never_a_500(
    client: httpx2.Client, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    headers = BROWSER_FORM if "data" in kwargs else ADMIN
    if "content" in kwargs:
        headers = {**headers, "content-type": "application/json"}
    response = client.request(method, "/settings/usage" + path, headers=headers, **kwargs)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["detail"]


def test_a_body_past_64_kib_is_a_413_and_a_method_off_the_routes_a_405(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    big = {"plan": "free", "padding": "x" * 70_000}
    response = client.put("/settings/usage/plan", json=big, headers=ADMIN)
    assert (response.status_code, response.headers["content-type"]) == (413, PROBLEM)
    assert guard.report("acme").plan == "pro"
    response = client.patch("/settings/usage/plan", json={"plan": "free"}, headers=ADMIN)
    assert (response.status_code, response.headers["content-type"]) == (405, PROBLEM)
    assert response.headers["allow"] == "POST, PUT"


def test_the_flask_page_reads_no_further_into_a_chunked_body_than_it_needs(
    guard: UsageGuard,
) -> None:
    import io

    from flask import Flask

    from usage_guard.flask import usage_blueprint

    class Body(io.RawIOBase):
        """5 MiB of a chunked body, counting what is read of it."""

        left, taken = 5 << 20, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            size = min(len(buffer), self.left)
            buffer[:size] = b"x" * size
            self.left -= size
            self.taken += size
            return size

    app = Flask(__name__)
    app.register_blueprint(usage_blueprint(guard, identify=identify, is_admin=is_admin))
    body = Body()
    environ = {
        "REQUEST_METHOD": "PUT",
        "PATH_INFO": "/plan",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "CONTENT_TYPE": "application/json",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "HTTP_X_ORG_ID": "acme",
        "HTTP_X_ADMIN": "1",
        "wsgi.input": io.BufferedReader(body),
        "wsgi.input_terminated": True,
    }
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)

    b"".join(app(environ, start_response))
    assert statuses == ["413 REQUEST ENTITY TOO LARGE"] and body.taken < 1 << 20


def test_the_flask_page_reads_a_form_another_extension_parsed_first(guard: UsageGuard) -> None:
    from flask import Flask, request

    from usage_guard.flask import usage_blueprint

    app = Flask(__name__)

    @app.before_request
    def audit() -> None:
        request.form.get("plan")  # e.g. an audit log, or Flask-WTF: it reads the body

    app.register_blueprint(usage_blueprint(guard, identify=identify, is_admin=is_admin))
    with frameworks.wsgi_client(app) as client:  # a real WSGI input stream, read once
        response = client.post("/plan", data={"plan": "free"}, headers=BROWSER_FORM)
    assert response.status_code == 200 and guard.report("acme").plan == "free"


def test_leading_zeros_are_read_past_ints_digit_limit(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    # The length check stripped them, int() did not: a 500 before.
    form = {"metric": "emails", "limit": "0" * 4300 + "7"}
    assert client.post("/settings/usage/limits", data=form, headers=BROWSER_FORM).status_code == 200
    assert guard.report("acme").meter("emails").limit == 7


def test_bad_identity_is_a_400_as_in_the_middleware(client: httpx2.Client) -> None:
    response = client.get("/settings/usage/", headers={"x-org-id": "o" * 300})
    assert (response.status_code, response.headers["content-type"]) == (400, PROBLEM)


def test_report_json_is_json_whatever_the_trailing_slash(client: httpx2.Client) -> None:
    response = client.get("/settings/usage/report.json/", headers={**ALICE, **HTML})
    assert response.headers["content-type"] == "application/json"


def test_a_plan_of_null_or_empty_resets_to_the_default(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    assert client.put("/settings/usage/plan", json={"plan": None}, headers=ADMIN).status_code == 200
    assert guard.report("acme").plan == "free"
    guard.assign_plan("acme", "pro")
    form = client.post("/settings/usage/plan", data={"plan": ""}, headers=BROWSER_FORM)
    assert form.status_code == 200 and guard.report("acme").plan == "free"


def test_sync_guard_and_plain_callables_work(
    guard: UsageGuard, serve: Callable[..., TestClient]
) -> None:
    app = Starlette()
    app.mount("/u", usage_app(guard, identify=lambda request: Subject("beta")))
    client = serve(app, guard)
    report = client.get("/u/").json()
    assert (report["organization"], report["personal"]) == ("beta", None)
    # No is_admin given: nobody is an admin.
    assert client.put("/u/plan", json={"plan": "pro"}).status_code == 403


def test_starlette_takes_async_identify_and_is_admin(
    guard: UsageGuard, serve: Callable[..., TestClient]
) -> None:
    async def async_identify(request: Request) -> Subject | None:
        return identify(request)

    async def async_is_admin(request: Request, subject: Subject) -> bool:
        return is_admin(request, subject)

    client = serve(mounted(guard, async_identify, async_is_admin), guard)
    assert (
        client.put("/settings/usage/plan", json={"plan": "free"}, headers=ALICE).status_code == 403
    )
    assert client.put("/settings/usage/plan", json={"plan": "free"}, headers=ADMIN).json() == {
        "plan": "free"
    }


def test_a_sync_framework_refuses_an_async_identify(guard: UsageGuard) -> None:
    from flask import Flask

    from usage_guard.flask import usage_blueprint

    async def async_identify(request: Any) -> Subject | None:
        return identify(request)

    app = Flask(__name__)
    app.testing = True  # the error reaches the test
    blueprint = usage_blueprint(guard, identify=async_identify)  # type: ignore[arg-type]
    app.register_blueprint(blueprint, url_prefix="/u")
    with pytest.raises(TypeError, match="identify must be a plain function"):
        app.test_client().get("/u/", headers=ALICE)


def test_unreachable_redis_is_a_503(serve_page: Callable[..., httpx2.Client]) -> None:
    guard = UsageGuard.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    client = serve_page(guard, identify=identify, is_admin=is_admin)
    response = client.get("/settings/usage/", headers=ALICE)
    assert (response.status_code, response.headers["content-type"]) == (503, PROBLEM)
    assert response.headers["retry-after"] == "5"
    # A browser gets a page that says so, and comes back by itself.
    page = client.get("/settings/usage/", headers={**ALICE, "accept": "text/html"})
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    assert page.headers["retry-after"] == "5"
    assert "Usage data cannot be read right now" in page.text
    assert '<meta http-equiv="refresh" content="5">' in page.text
    report = client.get("/settings/usage/report.json", headers={**ALICE, "accept": "text/html"})
    assert report.headers["content-type"] == PROBLEM  # .json asks for JSON whatever it accepts
    guard.close()


def test_every_bar_colour_meets_three_to_one_against_its_track() -> None:
    """WCAG 1.4.11: a bar is meaningful graphics, so its fill needs 3:1 next to the track."""
    style = (Path(usage_guard.dashboard.__file__).parent / "templates" / "style.html").read_text()
    colours = dict(re.findall(r"--([a-z]+): (#[0-9a-f]{6});", style))

    def luminance(hex_colour: str) -> float:
        channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    track = luminance(colours["track"])
    for status in ("blue", "yellow", "orange", "red"):
        ratio = (track + 0.05) / (luminance(colours[status]) + 0.05)
        assert ratio >= 3, (status, colours[status], round(ratio, 2))


def test_each_monthly_meter_says_when_it_resets_by_the_guards_clock(
    client: httpx2.Client,
) -> None:
    """The test clock reads 2026-11-15T12:00Z: December starts in 15.5 days."""
    page = client.get("/settings/usage/", headers={**ALICE, **HTML}).text
    emails = page[page.index('data-metric="emails"') :].split("</li>")[0]
    assert "Resets in 16 days" in emails
    contacts = page[page.index('data-metric="contacts"') :].split("</li>")[0]
    assert "Resets" not in contacts  # cumulative: never


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (0, "resets now"),
        (1, "resets in 1 hour"),
        (5 * 3600, "resets in 5 hours"),
        (86_400, "resets in 1 day"),
        (86_401, "resets in 2 days"),
    ],
)
def test_resets_in(seconds: int, said: str) -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    assert formatting.resets_in(now + timedelta(seconds=seconds), now) == said


def test_large_percentages_have_thousands_separators() -> None:
    assert (formatting.percent(1250.5), formatting.percent(85.0)) == ("1,250.5%", "85%")


def test_history_charts_follow_the_help_center_with_limits_and_readable_points(
    client: httpx2.Client,
) -> None:
    page = client.get("/settings/usage/", headers={**ALICE, **HTML}).text
    order = re.findall(r'<figure class="card chart" data-metric="([a-z_]+)"', page)
    assert order == ["emails", "ai_tokens", "contacts", "storage"]
    emails = page[page.index('<figure class="card chart" data-metric="emails"') :]
    emails = emails.split("</figure>")[0]
    assert '<line class="limit"' in emails and "<title>Limit: 20 K emails</title>" in emails
    points = re.findall(r'<circle class="point"[^>]*><title>([^<]+)</title>', emails)
    assert len(points) == 6 and points[-1] == "Nov: 18.5 K emails"


def test_an_empty_org_draws_flat_lines_on_the_baseline(client: httpx2.Client) -> None:
    page = client.get("/settings/usage/", headers={"x-org-id": "newco", **HTML}).text  # no use
    storage = page[page.index('<figure class="card chart" data-metric="storage"') :]
    storage = storage.split("</figure>")[0]
    assert 'class="y-max' not in storage  # no "0" sitting on the top gridline
    assert set(re.findall(r'cy="([0-9.]+)"', storage)) == {"154.0"}  # all on the baseline


def test_an_admin_sees_each_members_consumption_in_one_more_round_trip(
    guard: UsageGuard, client: httpx2.Client
) -> None:
    for n in range(30):
        guard.consume("acme", "ai_tokens", 100 + n, user=f"member{n:02d}")
    guard.set_budget("acme", "member29", "ai_tokens", 500)
    guard.set_budget("acme", "alice", "ai_tokens", 900_000)
    guard.set_limit("acme", "users", 25)
    page = client.get("/settings/usage/", headers={**ADMIN, **HTML}).text
    table = page[page.index('<table class="team-table" data-metric="ai_tokens"') :]
    table = table.split("</table>")[0]
    rows = re.findall(r'<tr><th scope="row">([^<]+)</th><td class="num">([^<]+)</td>', table)
    assert len(rows) == 20  # the top 20 whatever the team's size
    assert rows[0] == ("alice", "850 K tokens") and rows[1] == ("member29", "129 tokens")
    assert "500 tokens" in table and "Shared pool" in table
    # The admin forms show what is set now: the first metric's limit, alice's budget.
    assert re.search(r'id="limit-value"[^>]*value="25"', page)
    assert re.search(r'id="budget-value"[^>]*value="900000"', page)
    # A member who is not an admin sees no one else.
    assert (
        '<table class="team-table"'
        not in client.get("/settings/usage/", headers={**ALICE, **HTML}).text
    )


def test_members_reads_every_member_in_one_call_whatever_the_team_size(
    guard: UsageGuard,
) -> None:
    for n in range(300):
        guard.consume("acme", "ai_tokens", 1 + n % 7, user=f"m{n:03d}")
    reservation = guard.reserve("acme", "ai_tokens", 50, user="newcomer")  # no count yet
    members = guard.members("acme", top=3)["ai_tokens"]
    assert [(m.user, m.used) for m in members] == [
        ("alice", 850_000),
        ("newcomer", 50),
        ("m006", 7),
    ]
    reservation.cancel()
    assert [m.user for m in guard.members("acme", top=2)["ai_tokens"]] == ["alice", "m006"]


def test_the_demo_org_looks_like_a_real_one() -> None:
    """Growth, a dip, a flat meter and one taken up two months ago."""
    from usage_guard.demo import demo_guard

    guard = demo_guard(f"memory://demo-{uuid.uuid4().hex}")
    series = guard.report("acme").history.series
    guard.close()
    assert list(series["ai_tokens"]) == sorted(series["ai_tokens"])  # growth
    assert series["emails"][2] < series["emails"][1]  # a dip
    assert max(series["storage"]) < 1.05 * min(series["storage"])  # flat
    assert series["workflow_executions"][:3] == (0, 0, 0) and series["workflow_executions"][3]


def test_storage_is_labelled_once_and_shown_in_its_unit(client: httpx2.Client) -> None:
    page = client.get("/settings/usage/", headers={**ALICE, **HTML}).text
    storage = page[page.index('data-metric="storage"') :].split("</li>")[0]
    assert ">Storage</span>" in storage and "3.4 GB" in storage and "bytes" not in storage

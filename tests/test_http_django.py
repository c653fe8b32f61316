"""Django: the middleware in sync (WSGI) and async (ASGI) Django, its settings, and the
Usage page behind Django's own CSRF protection.

The page's behaviour itself is tested under every framework in test_dashboard*.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

import django_urls
import frameworks
from usage_guard import Plan, Subject, UsageGuard
from usage_guard.asgi import Rule, from_headers
from usage_guard.problem import QUOTA_EXCEEDED

PLANS = {"free": Plan("free", {"api_calls": 3, "emails": 1, "ai_tokens": 100})}
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
NOVEMBER = 30 * 24 * 3600
UNTIL_DECEMBER = 15 * 24 * 3600 + 12 * 3600
PROBLEM = "application/problem+json"
MIDDLEWARE = ["usage_guard.django.UsageGuardMiddleware"]


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture(params=frameworks.DJANGO_STACKS)
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def django(stack: str, serve_stack: Callable[..., httpx2.Client]) -> Callable[..., httpx2.Client]:
    """``django(guard, **USAGE_GUARD)``: a client of the test URLconf under ``stack``,
    with the middleware configured by ``settings.USAGE_GUARD``."""

    def start(guard: UsageGuard, middleware: list[str] = MIDDLEWARE, **options: Any) -> Any:
        setting = {"GUARD": guard, "IDENTIFY": from_headers(), **options}
        return serve_stack(
            stack, guard, USAGE_GUARD=setting, ROOT_URLCONF="django_urls", MIDDLEWARE=middleware
        )

    return start


def test_identified_requests_count_api_calls_with_ratelimit_fields(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard)
    response = client.get("/plain", headers=ALICE)
    assert response.json() == {"org": "acme"}
    assert response.headers["RateLimit-Policy"] == f'"api_calls";q=3;w={NOVEMBER}'
    assert response.headers["RateLimit"] == f'"api_calls";r=2;t={UNTIL_DECEMBER}'
    assert guard.usage("acme").meters["api_calls"].used == 1


def test_a_denied_request_never_reaches_the_view_and_gets_the_same_429(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard)
    served = django_urls.calls["served"]
    for _ in range(3):
        assert client.get("/plain", headers=ALICE).status_code == 200
    denied = client.get("/plain", headers=ALICE)
    assert (denied.status_code, denied.headers["content-type"]) == (429, PROBLEM)
    assert denied.json()["type"] == QUOTA_EXCEEDED
    assert denied.json()["violated-policies"] == ["api_calls"]
    assert denied.headers["Retry-After"] == str(UNTIL_DECEMBER)
    assert denied.headers["RateLimit"] == f'"api_calls";r=0;t={UNTIL_DECEMBER}'
    assert django_urls.calls["served"] == served + 3
    assert guard.usage("acme").meters["api_calls"].used == 3


@pytest.mark.parametrize("view", ["/email", "/email-async"])
def test_metered_sync_and_async_views_find_the_subject_and_answer_429(
    django: Callable[..., httpx2.Client], guard: UsageGuard, view: str
) -> None:
    client = django(guard)
    assert client.post(view, headers=ALICE).json() == {"status": "queued"}
    denied = client.post(view, headers=ALICE)
    assert (denied.status_code, denied.headers["content-type"]) == (429, PROBLEM)
    assert denied.json()["violated-policies"] == ["emails"]
    assert denied.headers["RateLimit"].startswith('"emails";r=0')
    usage = guard.usage("acme")
    assert usage.meters["emails"].used == 1
    # Refused inside the view: the request's API call is taken back.
    assert usage.meters["api_calls"].used == 1


def test_a_view_raising_its_own_429_counts_nothing(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    denied = django(guard).post("/bulk", headers=ALICE)
    assert (denied.status_code, denied.json()["metric"]) == (429, "emails")
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_a_streamed_body_meters_with_the_subject_bound(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    guard.set_limit("acme", "emails", 10)
    response = django(guard).get("/stream", headers=ALICE)
    assert response.text == "queued\nqueued\n"
    assert guard.usage("acme").meters["emails"].used == 2


def test_a_settings_override_takes_effect_on_a_built_handler(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard)
    with frameworks.django_settings(
        USAGE_GUARD={"GUARD": guard, "IDENTIFY": from_headers(), "REQUIRE_IDENTITY": True}
    ):
        assert client.get("/plain").status_code == 401
    assert client.get("/plain").status_code == 200


def test_anonymous_excluded_invalid_and_required_identity(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard, EXCLUDE=["/pla*"])
    assert client.get("/plain", headers=ALICE).json() == {"org": None}  # excluded: not bound
    assert guard.usage("acme").meters["api_calls"].used == 0
    anonymous = client.post("/email")  # reaches metered code without an organization
    assert (anonymous.status_code, anonymous.headers["content-type"]) == (401, PROBLEM)
    # Sent twice: WSGI servers and Django's ASGI handler join the values with a comma.
    twice = client.post("/email", headers={"x-org-id": "a,b"})
    assert (twice.status_code, twice.headers["content-type"]) == (400, PROBLEM)


def test_require_identity_answers_401_before_the_view(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    served = django_urls.calls["served"]
    response = django(guard, REQUIRE_IDENTITY=True).get("/plain")
    assert (response.status_code, response.headers["content-type"]) == (401, PROBLEM)
    assert django_urls.calls["served"] == served


def test_rules_meter_their_metric_in_the_same_call(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard, RULES=[Rule("/plain", "ai_tokens", amount=60)])
    assert client.get("/plain", headers=ALICE).status_code == 200
    denied = client.get("/plain", headers=ALICE)
    assert (denied.status_code, denied.json()["metric"]) == (429, "ai_tokens")
    usage = guard.usage("acme")
    assert (usage.meters["ai_tokens"].used, usage.meters["api_calls"].used) == (60, 1)


def test_an_async_identify_works_on_both_stacks(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    async def identify(request: Any) -> Subject | None:
        org = request.headers.get("x-org-id")
        return None if org is None else Subject(org)

    assert django(guard, IDENTIFY=identify).get("/plain", headers=ALICE).json() == {"org": "acme"}
    assert guard.usage("acme").meters["api_calls"].used == 1


def test_an_identify_object_with_an_async_call_works_on_both_stacks(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    class Identify:
        async def __call__(self, request: Any) -> Subject | None:
            return Subject(request.headers["x-org-id"])

    assert django(guard, IDENTIFY=Identify()).get("/plain", headers=ALICE).json() == {"org": "acme"}


def test_an_identify_that_reads_the_database_runs_off_the_event_loop(
    django: Callable[..., httpx2.Client], guard: UsageGuard, stack: str
) -> None:
    """Under ASGI a plain ``identify`` runs where Django runs sync code: reading
    ``request.user`` there is allowed (Django raises SynchronousOnlyOperation otherwise)."""
    from django.utils.asyncio import async_unsafe

    def lookup(request: Any) -> Subject | None:  # stands in for a session lookup
        return Subject(request.headers["x-org-id"])

    identify = async_unsafe(lookup)
    assert django(guard, IDENTIFY=identify).get("/plain", headers=ALICE).json() == {"org": "acme"}


def test_settings_name_functions_by_dotted_path(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    client = django(guard, IDENTIFY="examples.django_app.usage.identify")
    assert client.get("/plain", headers=ALICE).json() == {"org": "acme"}


#: Stands for the test's guard in the settings below.
GUARD = object()
HEADERS = from_headers()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"IDENTIFY": HEADERS}, r'USAGE_GUARD\["GUARD"\] is required'),
        ({"GUARD": "no.such.guard", "IDENTIFY": HEADERS}, r'\["GUARD"\]: cannot import'),
        ({"GUARD": "examples.django_app.usage.PLANS", "IDENTIFY": HEADERS}, "name a UsageGuard"),
        ({"GUARD": GUARD, "IDENTIFY": "examples.django_app.usage.PLANS"}, "must name a function"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "METER": "nope"}, "nope"),
        (
            {"GUARD": GUARD, "IDENTIFY": HEADERS, "GAURD": 1},
            r"unknown USAGE_GUARD keys \['GAURD'\]",
        ),
        ({"GUARD": GUARD, "IDENTIFY": None}, "must name a function"),
        ({"GUARD": GUARD, "IDENTIFY": "usage_guard.asgi.from_headers"}, "not <class"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "EXCLUDE": [b"/health"]}, "paths as strings"),
        # What a type checker catches in code, and settings would let through:
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "EXCLUDE": "/health"}, "a list of paths"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "STATUS_CODE": "429"}, "an HTTP error status"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "PING_ON_STARTUP": "false"}, "must be bool"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "REQUIRE_IDENTITY": 1}, "must be bool"),
        ({"GUARD": GUARD, "IDENTIFY": HEADERS, "TRUSTED_ORIGINS": ["nope"]}, "trusted origin"),
    ],
)
def test_misconfigurations_are_named_when_django_starts(
    guard: UsageGuard, setting: dict[str, Any], message: str
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from usage_guard.django.conf import configuration

    setting = {key: guard if value is GUARD else value for key, value in setting.items()}
    with (
        frameworks.django_settings(USAGE_GUARD=setting),
        pytest.raises(ImproperlyConfigured, match=message),
    ):
        configuration()


def budget_of(guard: UsageGuard, user: str) -> Any:
    return guard.report("acme", user=user).to_dict()["personal"]["meters"][0]["budget"]


def test_the_usage_page_is_protected_by_djangos_own_csrf(
    django: Callable[..., httpx2.Client], guard: UsageGuard
) -> None:
    admin = {
        **ALICE,
        "x-admin": "1",
        "sec-fetch-site": "same-origin",
        "origin": "http://testserver",
    }
    client = django(
        guard,
        middleware=["django.middleware.csrf.CsrfViewMiddleware", *MIDDLEWARE],
        IS_ADMIN=lambda request, subject: request.headers.get("x-admin") == "1",
        EXCLUDE=["/settings/usage*"],
    )
    page = client.get("/settings/usage/", headers={**admin, "accept": "text/html"})
    tokens = set(re.findall(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text))
    assert len(tokens) == 1 and page.text.count("csrfmiddlewaretoken") == 3  # one per form
    form = {"user": "bob", "metric": "ai_tokens", "budget": "40"}
    # Without the token, Django refuses the page's own form (its 403 page).
    client.cookies.clear()
    refused = client.post("/settings/usage/budgets", data=form, headers=admin)
    assert refused.status_code == 403 and budget_of(guard, "bob") is None
    # With it (and the cookie the page set), the form goes through and lands on the page.
    page = client.get("/settings/usage/", headers={**admin, "accept": "text/html"})
    [token] = set(re.findall(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text))
    posted = client.post(
        "/settings/usage/budgets",
        data={**form, "csrfmiddlewaretoken": token},
        headers=admin,
        follow_redirects=False,
    )
    assert (posted.status_code, posted.headers["location"]) == (303, "/settings/usage/")
    assert budget_of(guard, "bob") == 40
    # A script sends the token in X-CSRFToken, as Django expects.
    put = client.put(
        "/settings/usage/budgets/bob/ai_tokens",
        json={"budget": 50},
        headers={**ALICE, "x-admin": "1", "x-csrftoken": token},
    )
    assert put.json() == {"user": "bob", "metric": "ai_tokens", "budget": 50}


def test_djangos_own_test_clients_sync_and_async(guard: UsageGuard) -> None:
    """What a Django project's own tests use: django.test.Client and AsyncClient."""
    import asyncio

    from django.test import AsyncClient, Client

    setting = {"GUARD": guard, "IDENTIFY": from_headers(), "EXCLUDE": ["/settings/usage*"]}
    headers = {"x-org-id": "acme", "x-user-id": "alice"}
    with frameworks.django_settings(
        USAGE_GUARD=setting, ROOT_URLCONF="django_urls", MIDDLEWARE=MIDDLEWARE
    ):
        sync = Client(headers=headers)
        assert sync.get("/plain").json() == {"org": "acme"}
        assert sync.post("/email").json() == {"status": "queued"}
        denied = sync.post("/email")
        assert (denied.status_code, denied["Content-Type"]) == (429, PROBLEM)

        async def async_requests() -> list[int]:
            # Per request: AsyncClient(headers=...) sends them as HTTP_HTTP_X_ORG_ID (Django 5.2).
            client = AsyncClient()
            responses = [
                await client.get("/plain", headers=headers),
                await client.post("/email-async", headers=headers),
            ]
            await guard.aio.aclose()
            return [response.status_code for response in responses]

        assert asyncio.run(async_requests()) == [200, 429]
        page = sync.get("/settings/usage/report.json")
        assert page.json()["organization"] == "acme"
    usage = guard.usage("acme")
    # Two plain requests and one email served; the two refused emails counted nothing.
    assert (usage.meters["api_calls"].used, usage.meters["emails"].used) == (3, 1)


def test_the_page_reverses_by_name() -> None:
    frameworks.django_setup()
    from django.urls import reverse

    with frameworks.django_settings(ROOT_URLCONF="django_urls"):
        assert reverse("usage_guard:usage") == "/settings/usage/"
        below = reverse("usage_guard:usage-below", kwargs={"path": "report.json"})
        assert below == "/settings/usage/report.json"

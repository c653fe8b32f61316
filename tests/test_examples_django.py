"""The Django example project, sync and async, in-process and under ``manage.py runserver``
(gunicorn and uvicorn: test_examples_servers.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import httpx2
import pytest

import frameworks
from conftest import free_port, wait_for
from usage_guard import UsageGuard

ROOT = Path(__file__).resolve().parent.parent
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
PROBLEM = "application/problem+json"


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    from examples.django_app.usage import PLANS

    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture(params=frameworks.DJANGO_STACKS)
def client(
    request: pytest.FixtureRequest,
    guard: UsageGuard,
    serve_stack: Callable[..., httpx2.Client],
    monkeypatch: pytest.MonkeyPatch,
) -> httpx2.Client:
    """The example project on the test's guard, under WSGI and under ASGI."""
    frameworks.django_setup()
    import examples.django_app.usage as usage
    from django.conf import settings

    monkeypatch.setattr(usage, "guard", guard)
    # The same setting, read again: it imports the guard the test put in its place.
    return serve_stack(request.param, guard, USAGE_GUARD=dict(settings.USAGE_GUARD))


def test_ai_completion_reserves_then_settles_in_an_async_view(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    completion = {"prompt": "write a haiku", "max_tokens": 500}
    response = client.post("/v1/ai/complete", json=completion, headers=ALICE)
    assert response.json() == {"text": "haiku a write", "tokens": 6}
    usage = guard.usage("acme", "alice")
    assert usage.meters["ai_tokens"].used == 6 and usage.personal["ai_tokens"].used == 6
    assert client.post("/v1/ai/complete", json={"prompt": ""}, headers=ALICE).status_code == 422


def test_personal_budget_429_while_the_org_has_room(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    prompt = {"prompt": "hi", "max_tokens": 200}
    denied = client.post("/v1/ai/complete", json=prompt, headers=ALICE)
    assert (denied.status_code, denied.headers["content-type"]) == (429, PROBLEM)
    assert "Contact your admin to increase your allocation" in denied.json()["detail"]
    bob = {"x-org-id": "acme", "x-user-id": "bob"}
    assert client.post("/v1/ai/complete", json=prompt, headers=bob).status_code == 200


def test_emails_and_contacts(client: httpx2.Client, guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 1)
    email = {"to": "bob@example.com"}
    codes = [client.post("/v1/emails", json=email, headers=ALICE).status_code for _ in "ab"]
    assert codes == [200, 429]
    created = client.post("/v1/contacts", json={"name": "c"}, headers=ALICE)
    assert created.status_code == 201
    assert guard.usage("acme").meters["contacts"].used == 1
    assert client.delete(f"/v1/contacts/{created.json()['id']}", headers=ALICE).status_code == 204
    assert guard.usage("acme").meters["contacts"].used == 0
    # An email, a contact added and one removed were served; the refused email counts nothing.
    assert guard.usage("acme").meters["api_calls"].used == 3


def test_anonymous_callers_get_401_and_health_is_not_metered(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    anonymous = client.post("/v1/emails", json={"to": "x@example.com"})
    assert (anonymous.status_code, anonymous.headers["content-type"]) == (401, PROBLEM)
    assert client.get("/health", headers=ALICE).json() == {"status": "ok"}
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_the_usage_page_and_its_forms_behind_djangos_csrf(
    client: httpx2.Client, guard: UsageGuard
) -> None:
    browser = {"accept": "text/html", "sec-fetch-site": "same-origin"}
    page = client.get("/settings/usage/", headers=browser)
    assert page.status_code == 200 and "<title>Usage · acme</title>" in page.text
    [token] = set(re.findall(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text))
    form = {"metric": "emails", "limit": "250", "csrfmiddlewaretoken": token}
    response = client.post("/settings/usage/limits", data=form, headers=browser)
    assert response.url.path == "/settings/usage/"  # redirected back to the page
    assert guard.usage("acme").meters["emails"].limit == 250
    assert client.get("/settings/usage/report.json").json()["organization"] == "acme"


def test_manage_py_runserver_serves_the_api_and_the_page() -> None:
    port = free_port()
    env = {**os.environ, "USAGE_GUARD_URL": "memory://"}
    command = [sys.executable, "examples/django_app/manage.py", "runserver", "--noreload"]
    process = subprocess.Popen(
        [*command, f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(f"{base}/health"), 30, "runserver")
        email = httpx.post(f"{base}/v1/emails", json={"to": "x@example.com"}, headers=ALICE)
        assert email.json() == {"status": "queued", "to": "x@example.com"}
        assert email.headers["RateLimit"].startswith('"api_calls";r=9999')
        page = httpx.get(f"{base}/settings/usage/", headers={"accept": "text/html"})
        assert page.status_code == 200 and "csrfmiddlewaretoken" in page.text
    finally:
        process.terminate()
        process.wait(timeout=15)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

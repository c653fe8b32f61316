"""The Flask example app: every route in-process, and under gunicorn -w 3 on real Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from examples.flask_app.app import PLANS, create_app
from flask.testing import FlaskClient

from usage_guard import UsageGuard

ROOT = Path(__file__).resolve().parent.parent
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture
def client(guard: UsageGuard) -> FlaskClient:
    return create_app(guard).test_client()


def test_ai_completion_reserve_then_settle_and_cancel(
    client: FlaskClient, guard: UsageGuard
) -> None:
    response = client.post(
        "/v1/ai/complete", json={"prompt": "write a haiku", "max_tokens": 500}, headers=ALICE
    )
    assert response.json == {"text": "haiku a write", "tokens": 6}
    assert client.post("/v1/ai/complete", json={"prompt": ""}, headers=ALICE).status_code == 422
    usage = guard.usage("acme", "alice")
    assert usage.meters["ai_tokens"].used == 6 and usage.personal["ai_tokens"].used == 6


def test_personal_budget_429_while_the_org_has_room(client: FlaskClient, guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    denied = client.post("/v1/ai/complete", json={"prompt": "hi", "max_tokens": 200}, headers=ALICE)
    assert denied.status_code == 429 and denied.json is not None
    assert denied.json["scope"] == "personal"
    assert "Contact your admin to increase your allocation" in denied.json["detail"]
    bob = {"x-org-id": "acme", "x-user-id": "bob"}
    assert client.post("/v1/ai/complete", json={"prompt": "hi"}, headers=bob).status_code == 200


def test_emails_imports_and_contacts(client: FlaskClient, guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 1)
    email = {"to": "bob@example.com", "subject": "Hi"}
    assert [client.post("/v1/emails", json=email, headers=ALICE).status_code for _ in "ab"] == [
        200,
        429,
    ]
    rows = "name,email\na,a@x\nb,b@x\n"
    assert client.post("/v1/imports", data=rows, headers=ALICE).json == {"imported": 2}
    guard.set_limit("acme", "contacts", 2)  # soft cap: 110 % of 2 admits 2
    denied = client.post("/v1/imports", data=rows, headers=ALICE)
    assert denied.status_code == 429 and denied.json is not None
    assert denied.json["metric"] == "contacts" and "retry-after" not in denied.headers
    assert guard.usage("acme").meters["import_rows"].used == 2  # all or nothing
    guard.remove_limit("acme", "contacts")
    created = client.post("/v1/contacts", json={"name": "c", "email": "c@x"}, headers=ALICE)
    assert created.status_code == 201 and created.json is not None
    assert guard.usage("acme").meters["contacts"].used == 3
    assert client.delete(f"/v1/contacts/{created.json['id']}", headers=ALICE).status_code == 204
    assert guard.usage("acme").meters["contacts"].used == 2


def test_health_is_not_metered(client: FlaskClient, guard: UsageGuard) -> None:
    assert client.get("/health", headers=ALICE).status_code == 200
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_the_usage_page_is_registered_and_not_metered(
    client: FlaskClient, guard: UsageGuard
) -> None:
    guard.consume("acme", "emails", 7).raise_for_status()
    report = client.get("/settings/usage/report.json", headers=ALICE).json
    assert report is not None and report["organization"] == "acme"
    # The demo's visitor (no headers) is acme's admin: its form changes acme's limit.
    browser = {"sec-fetch-site": "same-origin"}
    form = {"metric": "emails", "limit": "250"}
    posted = client.post("/settings/usage/limits", data=form, headers=browser)
    assert (posted.status_code, posted.headers["location"]) == (303, "/settings/usage/")
    usage = guard.usage("acme")
    assert usage.meters["emails"].limit == 250 and usage.meters["api_calls"].used == 0


def test_bad_bodies_are_422_not_500(client: FlaskClient) -> None:
    for path, body in [
        ("/v1/ai/complete", {}),
        ("/v1/ai/complete", {"prompt": "hi", "max_tokens": "many"}),
        ("/v1/emails", {"to": "bob@example.com"}),
        ("/v1/emails", ["not", "an", "object"]),
    ]:
        assert client.post(path, json=body, headers=ALICE).status_code == 422, (path, body)

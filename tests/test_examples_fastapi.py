"""The FastAPI example app: every route in-process, and under a real uvicorn on real Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from examples.fastapi_app.app import PLANS, create_app
from fastapi.testclient import TestClient

from usage_guard import UsageGuard

ROOT = Path(__file__).resolve().parent.parent
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture
def client(guard: UsageGuard, serve: Callable[..., TestClient]) -> TestClient:
    return serve(create_app(guard), guard)


def test_ai_completion_reserves_max_tokens_and_settles_to_the_tokens_used(
    client: TestClient, guard: UsageGuard
) -> None:
    response = client.post(
        "/v1/ai/complete", json={"prompt": "write a haiku", "max_tokens": 500}, headers=ALICE
    )
    assert response.json() == {"text": "haiku a write", "tokens": 6}
    usage = guard.usage("acme", "alice")
    assert usage.meters["ai_tokens"].used == 6 and usage.personal["ai_tokens"].used == 6
    failed = client.post("/v1/ai/complete", json={"prompt": "fail"}, headers=ALICE)
    assert failed.status_code == 502
    assert guard.usage("acme").meters["ai_tokens"].used == 6  # cancelled
    blank = client.post("/v1/ai/complete", json={"prompt": " "}, headers=ALICE)
    assert blank.status_code == 422  # refused by the schema, before any reservation


def test_personal_ai_budget_429_while_the_org_has_room(
    client: TestClient, guard: UsageGuard
) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    denied = client.post("/v1/ai/complete", json={"prompt": "hi", "max_tokens": 200}, headers=ALICE)
    assert denied.status_code == 429
    assert denied.json()["scope"] == "personal"
    assert "Contact your admin to increase your allocation" in denied.json()["detail"]
    bob = {"x-org-id": "acme", "x-user-id": "bob"}
    assert client.post("/v1/ai/complete", json={"prompt": "hi"}, headers=bob).status_code == 200


def test_email_send_is_capped_and_counts_api_calls(client: TestClient, guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 2)
    email = {"to": "bob@example.com", "subject": "Hi"}
    codes = [client.post("/v1/emails", json=email, headers=ALICE).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    meters = guard.usage("acme").meters
    # The refused third request counts no API call either.
    assert (meters["emails"].used, meters["api_calls"].used) == (2, 2)


def test_csv_import_is_all_or_nothing_and_contacts_move_both_ways(
    client: TestClient, guard: UsageGuard
) -> None:
    csv_rows = "name,email\n" + "".join(f"n{i},n{i}@example.com\n" for i in range(3))
    assert client.post("/v1/imports", content=csv_rows, headers=ALICE).json() == {"imported": 3}
    guard.set_limit("acme", "import_rows", 5)
    denied = client.post("/v1/imports", content=csv_rows, headers=ALICE)
    assert denied.status_code == 429 and denied.json()["metric"] == "import_rows"
    meters = guard.usage("acme").meters
    assert (meters["import_rows"].used, meters["contacts"].used) == (3, 3)
    created = client.post("/v1/contacts", json={"name": "x", "email": "x@x"}, headers=ALICE)
    assert created.status_code == 201
    assert guard.usage("acme").meters["contacts"].used == 4
    contact_id = created.json()["id"]
    assert client.delete(f"/v1/contacts/{contact_id}", headers=ALICE).status_code == 204
    assert client.delete(f"/v1/contacts/{contact_id}", headers=ALICE).status_code == 404
    assert guard.usage("acme").meters["contacts"].used == 3


def test_health_is_not_metered_and_openapi_shows_the_429(
    client: TestClient, guard: UsageGuard
) -> None:
    assert client.get("/health", headers=ALICE).status_code == 200
    assert guard.usage("acme").meters["api_calls"].used == 0
    paths = client.get("/openapi.json").json()["paths"]
    assert "429" in paths["/v1/emails"]["post"]["responses"]

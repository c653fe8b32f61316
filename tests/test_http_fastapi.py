"""FastAPI: the require() dependency, sync endpoints, install() and the OpenAPI 429."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from usage_guard import Decision, Plan, UsageGuard, current_subject, metered
from usage_guard.asgi import from_headers
from usage_guard.fastapi import install, require

PLANS = {"free": Plan("free", {"enrichments": 2, "ai_tokens": 100, "api_calls": 1000})}
Metered = Annotated[Decision, Depends(require("enrichments", 1))]
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}


@metered("ai_tokens", amount=lambda n: n)
def sync_generate(n: int) -> str:
    return "x" * n


def build(guard: UsageGuard) -> FastAPI:
    app = FastAPI()
    install(app, guard=guard, identify=from_headers(), exclude=["/openapi.json"])

    @app.post("/enrich")
    async def enrich(decision: Metered) -> dict[str, int]:
        return {"remaining": decision.remaining or 0}

    @app.post("/enrich-sync", dependencies=[Depends(require("enrichments", guard=guard))])
    def enrich_sync() -> dict[str, str | None]:
        who = current_subject()
        return {"org": None if who is None else who.org}

    @app.post("/generate")
    def generate(n: int) -> dict[str, int]:
        # A sync endpoint in the threadpool: @metered uses the guard's sync side.
        return {"length": len(sync_generate(n))}

    @app.get("/free")
    def free() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture
def client(guard: UsageGuard, serve: Callable[..., TestClient]) -> TestClient:
    return serve(build(guard), guard)


def test_dependency_meters_async_and_sync_endpoints(client: TestClient, guard: UsageGuard) -> None:
    assert client.post("/enrich", headers=ALICE).json() == {"remaining": 1}
    assert client.post("/enrich-sync", headers=ALICE).json() == {"org": "acme"}
    denied = client.post("/enrich", headers=ALICE)
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["ratelimit-policy"].startswith('"enrichments";q=2;w=')
    assert denied.json()["metric"] == "enrichments"
    usage = guard.usage("acme", "alice")
    assert usage.meters["enrichments"].used == 2 and usage.personal["enrichments"].used == 2
    assert usage.meters["api_calls"].used == 2  # the denied request counts no API call


def test_metered_in_a_sync_endpoint_turns_into_the_429(
    client: TestClient, guard: UsageGuard
) -> None:
    assert client.post("/generate?n=60", headers=ALICE).json() == {"length": 60}
    denied = client.post("/generate?n=60", headers=ALICE)
    assert denied.status_code == 429
    body = denied.json()
    assert (body["metric"], body["scope"], body["used"], body["limit"]) == (
        "ai_tokens",
        "organization",
        60,
        100,
    )
    assert denied.headers["ratelimit-policy"].count('"') == 4  # only the denying metric


def test_dependency_without_identity_is_a_401(client: TestClient) -> None:
    assert client.post("/enrich").status_code == 401
    assert client.get("/free").status_code == 200


def test_openapi_documents_the_429_on_routes_with_the_dependency_only(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/enrich", "/enrich-sync"):
        response = paths[path]["post"]["responses"]["429"]
        assert "application/problem+json" in response["content"]
        assert "Retry-After" in response["headers"]
    assert "429" not in paths["/generate"]["post"]["responses"]
    assert "429" not in paths["/free"]["get"]["responses"]


def test_require_with_an_unknown_metric_fails_at_declaration(guard: UsageGuard) -> None:
    with pytest.raises(ValueError, match="sms"):
        require("sms", guard=guard)

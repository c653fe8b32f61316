"""FastAPI: the require() dependency, sync endpoints, install() and the OpenAPI 429."""

from __future__ import annotations

import json
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


def test_openapi_documents_what_the_guard_answers_on_every_route_it_does_not_exclude(
    client: TestClient,
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (("/enrich", "post"), ("/generate", "post"), ("/free", "get")):
        responses = paths[path][method]["responses"]
        # The middleware meters api_calls on every route: a 429 anywhere.
        assert "application/problem+json" in responses["429"]["content"]
        assert "Retry-After" in responses["429"]["headers"]
        assert "application/problem+json" in responses["400"]["content"]  # an id it rejects
        assert "503" not in responses  # every metric fails open
        # Metered code (here @metered in /generate) reached anonymously: a 401 anywhere.
        assert "application/problem+json" in responses["401"]["content"]


def test_openapi_documents_the_503_when_a_metric_fails_closed_and_nothing_when_excluded(
    make_guard: Callable[..., UsageGuard],
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", on_backend_error={"enrichments": "deny"})
    app = FastAPI()
    install(app, guard=guard, identify=from_headers(), meter=None, exclude=["/health"])

    @app.post("/enrich", dependencies=[Depends(require("enrichments", guard=guard))])
    def enrich() -> None: ...

    @app.get("/free")
    def free() -> None: ...

    @app.get("/health")
    def health() -> None: ...

    schema = app.openapi()
    paths = schema["paths"]
    assert {"400", "401", "429", "503"} <= set(paths["/enrich"]["post"]["responses"])
    assert "Retry-After" in paths["/enrich"]["post"]["responses"]["503"]["headers"]
    assert {"400", "401", "429", "503"} <= set(paths["/free"]["get"]["responses"])
    assert set(paths["/health"]["get"]["responses"]) == {"200"}  # excluded: nothing of ours
    assert "nullable" not in json.dumps(schema)  # OpenAPI 3.1: null is a type


def test_require_with_an_unknown_metric_fails_at_declaration(guard: UsageGuard) -> None:
    with pytest.raises(ValueError, match="sms"):
        require("sms", guard=guard)

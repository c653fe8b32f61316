"""What the client or the app's input got wrong is a 4xx problem, never a 500: ASGI,
FastAPI and Flask alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from usage_guard import Decision, Plan, UsageGuard, UsageGuardMiddleware, metered
from usage_guard.asgi import from_headers
from usage_guard.fastapi import install, require
from usage_guard.flask import UsageGuardFlask

PLANS = {"free": Plan("free", {"ai_tokens": 1_000_000, "api_calls": 1_000_000})}
PROBLEM = "application/problem+json"
ACME = {"x-org-id": "acme"}
BAD_AMOUNTS = [-1, 2**53, 2**64]


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@metered("ai_tokens", amount=lambda tokens: tokens)
def complete(tokens: int) -> dict[str, str]:
    return {"text": "..."}


def starlette_app(guard: UsageGuard) -> Starlette:
    async def ai(request: Request) -> JSONResponse:
        return JSONResponse(complete((await request.json())["tokens"]))

    async def rows(request: Request) -> JSONResponse:
        count = (await request.json())["rows"]
        decision = await guard.aio.consume(_org(request), {"import_rows": count})
        return JSONResponse({"allowed": decision.allowed})

    app = Starlette(
        routes=[Route("/ai", ai, methods=["POST"]), Route("/rows", rows, methods=["POST"])]
    )
    app.add_middleware(UsageGuardMiddleware, guard=guard, identify=from_headers())
    return app


def _org(request: Request) -> str:
    return request.headers.get("x-org-id", "")


def fastapi_app(guard: UsageGuard) -> FastAPI:
    app = FastAPI()
    install(app, guard=guard, identify=from_headers())

    @app.post("/ai")
    def ai(body: dict[str, int]) -> dict[str, str]:
        return complete(body["tokens"])

    @app.get("/required", dependencies=[Depends(require("ai_tokens", 10))])
    def required() -> dict[str, str]:
        return {"ok": "yes"}

    return app


def flask_app(guard: UsageGuard) -> Flask:
    app = Flask(__name__)
    UsageGuardFlask(app, guard=guard, identify=from_headers())

    @app.post("/ai")
    def ai() -> dict[str, str]:
        return complete(flask_request.get_json()["tokens"])

    return app


class Client:
    """The same requests to a Starlette, FastAPI or Flask app."""

    def __init__(self, kind: str, guard: UsageGuard, serve: Callable[..., TestClient]) -> None:
        self.kind = kind
        if kind == "flask":
            self.flask = flask_app(guard).test_client()
        else:
            self.asgi = serve(
                starlette_app(guard) if kind == "starlette" else fastapi_app(guard), guard
            )

    def post(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, str, Any]:
        if self.kind == "flask":
            response = self.flask.post(path, json=body, headers=headers)
            return response.status_code, response.content_type, response.get_json()
        reply = self.asgi.post(path, json=body, headers=headers)
        return reply.status_code, reply.headers["content-type"], reply.json()


@pytest.fixture(params=["starlette", "fastapi", "flask"])
def client(
    request: pytest.FixtureRequest, guard: UsageGuard, serve: Callable[..., TestClient]
) -> Client:
    return Client(request.param, guard, serve)


def test_an_anonymous_request_reaching_metered_code_is_a_401(client: Client) -> None:
    status, media, body = client.post("/ai", {"tokens": 5}, {})
    assert (status, media) == (401, PROBLEM)
    assert body["detail"] == "This action needs an identified organization."


@pytest.mark.parametrize("tokens", BAD_AMOUNTS)
def test_an_amount_from_the_body_the_guard_rejects_is_a_422(
    client: Client, guard: UsageGuard, tokens: int
) -> None:
    status, media, body = client.post("/ai", {"tokens": tokens}, ACME)
    assert (status, media) == (422, PROBLEM)
    assert "amount" in body["detail"]
    # The refused request charged nothing.
    assert guard.usage("acme").meters["ai_tokens"].used == 0


def test_a_negative_row_count_in_a_consume_mapping_is_a_422(
    guard: UsageGuard, serve: Callable[..., TestClient]
) -> None:
    http = serve(starlette_app(guard), guard)
    response = http.post("/rows", json={"rows": -5}, headers=ACME)
    assert (response.status_code, response.headers["content-type"]) == (422, PROBLEM)


def test_require_without_an_identity_is_a_problem_401(
    guard: UsageGuard, serve: Callable[..., TestClient]
) -> None:
    response = serve(fastapi_app(guard), guard).get("/required")
    assert (response.status_code, response.headers["content-type"]) == (401, PROBLEM)


@pytest.mark.parametrize("header", ["x-org-id", "x-user-id"])
def test_an_identity_header_sent_twice_is_a_400(
    client: Client, guard: UsageGuard, header: str
) -> None:
    # A gateway that appends instead of replacing: which org to charge is ambiguous.
    headers = [("x-org-id", "acme"), ("x-user-id", "alice"), (header, "globex")]
    if client.kind == "flask":
        response = client.flask.post("/ai", json={"tokens": 1}, headers=headers)
        status, media = response.status_code, response.content_type
    else:
        raw = client.asgi.post(
            "/ai",
            content=json.dumps({"tokens": 1}),
            headers=[*headers, ("content-type", "application/json")],
        )
        status, media = raw.status_code, raw.headers["content-type"]
    assert (status, media) == (400, PROBLEM)
    for org in ("acme", "globex"):
        assert guard.usage(org).meters["api_calls"].used == 0


def test_from_headers_reads_one_value_per_header_from_any_request() -> None:
    identify = from_headers()
    single = Request({"type": "http", "headers": [(b"x-org-id", b"acme")]})
    assert identify(single) is not None
    double = Request({"type": "http", "headers": [(b"x-org-id", b"a"), (b"x-org-id", b"b")]})
    joined = Request({"type": "http", "headers": [(b"x-org-id", b"a, b")]})
    for ambiguous in (double, joined):
        with pytest.raises(ValueError, match="more than once"):
            identify(ambiguous)
        with pytest.raises(ValueError, match="more than once"):
            identify.from_scope(ambiguous.scope)


# -- nothing charged for a refused request -------------------------------------------

EMAIL_CAP = {"free": Plan("free", {"emails": 5, "api_calls": 1_000})}


@metered("emails")
def send_email() -> dict[str, str]:
    return {"sent": "yes"}


def refusing_apps(guard: UsageGuard) -> dict[str, Any]:
    """Apps whose handlers refuse past the email cap, each way a handler can."""

    async def starlette_send(request: Request) -> JSONResponse:
        return JSONResponse(send_email())

    async def starlette_unavailable(request: Request) -> JSONResponse:
        outage = Decision(False, "emails", "unavailable", 0, None, None, None)
        outage.raise_for_status()
        return JSONResponse({})

    starlette = Starlette(
        routes=[
            Route("/send", starlette_send, methods=["POST"]),
            Route("/outage", starlette_unavailable, methods=["POST"]),
        ]
    )
    starlette.add_middleware(UsageGuardMiddleware, guard=guard, identify=from_headers())

    fastapi = FastAPI()
    install(fastapi, guard=guard, identify=from_headers())

    @fastapi.post("/send", dependencies=[Depends(require("emails"))])
    def fastapi_send() -> dict[str, str]:
        return {"sent": "yes"}

    @fastapi.post("/outage")
    async def fastapi_checked() -> dict[str, str]:
        (await guard.aio.consume("acme", "emails")).raise_for_status()
        return {"sent": "yes"}

    flask = Flask(__name__)
    UsageGuardFlask(flask, guard=guard, identify=from_headers())
    flask.post("/send")(send_email)
    return {"starlette": starlette, "fastapi": fastapi, "flask": flask}


@pytest.mark.parametrize("kind", ["starlette", "fastapi", "flask"])
def test_a_request_refused_inside_the_app_counts_no_api_call(
    make_guard: Callable[..., UsageGuard], serve: Callable[..., TestClient], kind: str
) -> None:
    guard = make_guard(plans=EMAIL_CAP, default_plan="free")
    app = refusing_apps(guard)[kind]
    post = app.test_client().post if kind == "flask" else serve(app, guard).post
    statuses = [post("/send", headers=ACME).status_code for _ in range(20)]
    assert statuses == [200] * 5 + [429] * 15
    usage = guard.usage("acme").meters
    # Clients retrying 429s do not drain their API quota: only the served requests count.
    assert (usage["api_calls"].used, usage["emails"].used) == (5, 5)


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_a_503_answered_from_inside_the_app_counts_nothing_either(
    make_guard: Callable[..., UsageGuard], serve: Callable[..., TestClient], kind: str
) -> None:
    guard = make_guard(plans=EMAIL_CAP, default_plan="free")
    guard.consume("acme", "emails", 5)  # the FastAPI route then refuses with a 429
    client = serve(refusing_apps(guard)[kind], guard)
    assert client.post("/outage", headers=ACME).status_code in (429, 503)
    assert guard.usage("acme").meters["api_calls"].used == 0


# -- truthful 429s ----------------------------------------------------------------------


def test_a_request_for_more_than_remains_is_told_what_it_asked_and_what_is_left(
    client: Client, guard: UsageGuard
) -> None:
    guard.set_limit("acme", "ai_tokens", 1_000)
    guard.consume("acme", "ai_tokens", 406)
    status, media, body = client.post("/ai", {"tokens": 600}, ACME)
    assert (status, media) == (429, PROBLEM)
    until = guard.usage("acme").period.end
    assert body["detail"] == (
        f"This request needs 600 AI tokens; 594 of 1,000 remain until {until:%b} {until.day}."
    )
    assert (body["used"], body["limit"]) == (406, 1_000)
    # A request that fits what is left is still served.
    assert client.post("/ai", {"tokens": 594}, ACME)[0] == 200


def test_the_ratelimit_field_of_a_denial_carries_the_true_remaining(
    guard: UsageGuard, serve: Callable[..., TestClient]
) -> None:
    guard.set_limit("acme", "ai_tokens", 1_000)
    guard.consume("acme", "ai_tokens", 406)
    response = serve(starlette_app(guard), guard).post("/ai", json={"tokens": 600}, headers=ACME)
    assert response.status_code == 429
    assert response.headers["ratelimit"].startswith('"ai_tokens";r=594;t=')

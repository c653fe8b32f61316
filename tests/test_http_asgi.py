"""UsageGuardMiddleware on a bare Starlette app: every path, the 429 exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from usage_guard import Plan, Subject, UsageGuard, UsageGuardMiddleware, current_subject, metered
from usage_guard.asgi import Rule, from_headers, from_state
from usage_guard.problem import QUOTA_EXCEEDED, REDUCED_CAPACITY

PLANS = {
    "free": Plan(
        "free",
        {"api_calls": 3, "ai_tokens": 1000, "emails": 5, "contacts": 10, "storage": None},
    )
}
ORG = {"x-org-id": "acme", "x-user-id": "alice"}
NOVEMBER = 30 * 24 * 3600
# The test clock stands at 2026-11-15T12:00Z: 15.5 days before December.
UNTIL_DECEMBER = 15 * 24 * 3600 + 12 * 3600


@metered("ai_tokens", amount=lambda tokens: tokens)
async def generate(tokens: int) -> str:
    return "x" * tokens


def build_app(guard: UsageGuard | Any, **options: Any) -> Starlette:
    calls: list[str] = []

    async def index(request: Request) -> JSONResponse:
        calls.append(request.url.path)
        who = current_subject()
        return JSONResponse({"org": who and who.org, "user": who and who.user})

    async def ai(request: Request) -> PlainTextResponse:
        calls.append(request.url.path)
        return PlainTextResponse(await generate(int(request.query_params["tokens"])))

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", index),
            Route("/emails", index, methods=["POST", "GET"]),
            Route("/ai", ai),
            WebSocketRoute("/ws", ws),
        ]
    )
    options.setdefault("identify", from_headers())
    app.add_middleware(UsageGuardMiddleware, guard=guard, **options)
    app.state.calls = calls
    return app


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


@pytest.fixture
def client_for(guard: UsageGuard, serve: Callable[..., TestClient]) -> Callable[..., TestClient]:
    """``client_for(app, on=guard)``: a started test client of an app guarded by ``on``."""

    def make(app: Starlette, on: UsageGuard = guard) -> TestClient:
        return serve(app, on)

    return make


def test_identified_request_counts_one_api_call_and_carries_ratelimit_fields(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    client = client_for(build_app(guard))
    response = client.get("/", headers=ORG)
    assert response.status_code == 200
    assert response.json() == {"org": "acme", "user": "alice"}
    assert response.headers["ratelimit-policy"] == f'"api_calls";q=3;w={NOVEMBER}'
    assert response.headers["ratelimit"] == f'"api_calls";r=2;t={UNTIL_DECEMBER}'
    assert "acme" not in str(response.headers) and "alice" not in str(response.headers)
    assert guard.usage("acme").meters["api_calls"].used == 1


def test_exhausted_api_calls_answer_the_429_exactly_and_never_reach_the_handler(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    app = build_app(guard)
    client = client_for(app)
    for _ in range(3):
        assert client.get("/", headers=ORG).status_code == 200
    denied = client.get("/", headers=ORG)
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["retry-after"] == str(UNTIL_DECEMBER)
    assert denied.headers["ratelimit-policy"] == f'"api_calls";q=3;w={NOVEMBER}'
    assert denied.headers["ratelimit"] == f'"api_calls";r=0;t={UNTIL_DECEMBER}'
    body = denied.json()
    assert body == {
        "type": QUOTA_EXCEEDED,
        "title": "Usage limit exceeded",
        "status": 429,
        "detail": body["detail"],
        "violated-policies": ["api_calls"],
        "metric": "api_calls",
        "scope": "organization",
        "limit": 3,
        "used": 3,
        "resets_at": "2026-12-01T00:00:00Z",
    }
    assert "API calls" in body["detail"] and "2026-12-01T00:00:00Z" in body["detail"]
    assert app.state.calls == ["/", "/", "/"]
    assert guard.usage("acme").meters["api_calls"].used == 3


def test_retry_after_rounds_up_to_the_next_whole_second(
    guard: UsageGuard, clock: Any, client_for: Callable[..., TestClient]
) -> None:
    guard.set_limit("acme", "api_calls", 0)
    clock.set(2026, 11, 30, 23, 59, 58, 500000)
    denied = client_for(build_app(guard)).get("/", headers=ORG)
    assert denied.headers["retry-after"] == "2"
    assert denied.headers["ratelimit"] == '"api_calls";r=0;t=2'


def test_personal_budget_denial_tells_the_user_to_ask_their_admin(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    client = client_for(build_app(guard))
    assert client.get("/ai?tokens=80", headers=ORG).status_code == 200
    denied = client.get("/ai?tokens=30", headers=ORG)
    assert denied.status_code == 429
    body = denied.json()
    assert (body["metric"], body["scope"], body["limit"], body["used"]) == (
        "ai_tokens",
        "personal",
        100,
        80,
    )
    # What was asked and what remains, truthfully: 30 asked, 20 left (not "r=0").
    assert body["detail"] == (
        "This request needs 30 AI tokens; 20 of your 100 remain until Dec 1. "
        "Contact your admin to increase your allocation."
    )
    assert denied.headers["ratelimit-policy"] == f'"ai_tokens";q=100;w={NOVEMBER};ug-unit="tokens"'
    assert denied.headers["ratelimit"] == f'"ai_tokens";r=20;t={UNTIL_DECEMBER}'
    # The org still has room: another user of the same org is served.
    bob = client.get("/ai?tokens=30", headers={"x-org-id": "acme", "x-user-id": "bob"})
    assert bob.status_code == 200
    assert guard.usage("acme").meters["ai_tokens"].used == 110


def test_cumulative_denial_has_no_retry_after_and_no_window(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    app = build_app(guard, meter=None, rules=[Rule("/emails", "contacts", 4, frozenset({"POST"}))])
    client = client_for(app)
    guard.set_usage("acme", "contacts", 8)
    denied = client.post("/emails", headers=ORG)
    assert denied.status_code == 429
    assert "retry-after" not in denied.headers
    assert denied.headers["ratelimit-policy"] == '"contacts";q=11;ug-unit="contacts"'
    assert denied.headers["ratelimit"] == '"contacts";r=3'
    assert denied.json()["detail"] == "This request needs 4 Contacts; 3 of 10 remain."
    assert denied.json()["resets_at"] is None
    assert client.get("/emails", headers=ORG).status_code == 200  # the rule is POST only


def test_route_rules_count_with_api_calls_in_one_call(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    client = client_for(build_app(guard, rules=[Rule("/emails", "emails", 2, frozenset({"POST"}))]))
    served = client.post("/emails", headers=ORG)
    assert served.status_code == 200
    # The fields of every metric the request consumed, not only api_calls: a client
    # reading only "api_calls" would be surprised by a 429 on emails.
    policies = served.headers["ratelimit-policy"].split(", ")
    states = served.headers["ratelimit"].split(", ")
    assert [p.split(";")[0] for p in policies] == ['"api_calls"', '"emails"']
    assert states[1] == f'"emails";r=3;t={UNTIL_DECEMBER}'
    meters = guard.usage("acme").meters
    assert (meters["api_calls"].used, meters["emails"].used) == (1, 2)
    guard.set_limit("acme", "emails", 3)
    denied = client.post("/emails", headers=ORG)
    assert denied.json()["metric"] == "emails"
    meters = guard.usage("acme").meters
    assert (meters["api_calls"].used, meters["emails"].used) == (1, 2)  # all or nothing


def test_anonymous_requests_pass_unmetered_or_get_401(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    open_app = client_for(build_app(guard))
    response = open_app.get("/")
    assert response.status_code == 200 and "ratelimit" not in response.headers
    strict = client_for(build_app(guard, require_identity=True)).get("/")
    assert strict.status_code == 401
    assert strict.headers["content-type"] == "application/problem+json"
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_invalid_identity_is_a_400_problem(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    client = client_for(build_app(guard))
    response = client.get("/", headers={"x-org-id": "a" * 300})
    assert response.status_code == 400
    assert json.loads(response.text)["title"] == "Bad Request"


def test_identify_errors_propagate_and_async_identify_works(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    async def by_query(request: Request) -> Subject | None:
        if "broken" in request.query_params:
            raise RuntimeError("auth backend down")
        org = request.query_params.get("org")
        return None if org is None else Subject(org)

    client = client_for(build_app(guard, identify=by_query))
    assert client.get("/?org=globex").json() == {"org": "globex", "user": None}
    assert guard.usage("globex").meters["api_calls"].used == 1
    with pytest.raises(RuntimeError, match="auth backend down"):
        client.get("/?org=globex&broken=1")
    assert guard.usage("globex").meters["api_calls"].used == 1


def test_identify_from_state_set_by_an_auth_middleware(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    app = build_app(guard, identify=from_state())
    inner = app.build_middleware_stack()

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {}).update(org_id="initech", user_id="peter")
        await inner(scope, receive, send)

    client = client_for(auth)
    assert client.get("/").json() == {"org": "initech", "user": "peter"}
    request = Request({"type": "http", "state": {"org_id": "initech"}})
    assert from_state()(request) == Subject("initech", None)


def test_excluded_paths_and_prefixes_are_not_metered(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    client = client_for(build_app(guard, exclude=["/health", "/em*"]))
    assert client.get("/health", headers=ORG).status_code == 200
    assert client.get("/emails", headers=ORG).status_code == 200
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_ratelimit_fields_on_success_can_be_turned_off(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    response = client_for(build_app(guard, ratelimit_headers=False)).get("/", headers=ORG)
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers


def test_status_code_is_configurable(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    guard.set_limit("acme", "api_calls", 0)
    denied = client_for(build_app(guard, status_code=402)).get("/", headers=ORG)
    assert denied.status_code == 402 and denied.json()["status"] == 402


def test_websocket_and_lifespan_pass_untouched(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    guard.set_limit("acme", "api_calls", 0)
    client = client_for(build_app(guard))  # entering the client ran the lifespan
    with client.websocket_connect("/ws", headers=ORG) as websocket:
        assert websocket.receive_text() == "hello"
    assert guard.usage("acme").meters["api_calls"].used == 0


def test_the_middleware_wraps_any_asgi_app_and_accepts_the_async_guard(
    guard: UsageGuard, client_for: Callable[..., TestClient]
) -> None:
    lifespan: list[str] = []

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                lifespan.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await PlainTextResponse("bare")(scope, receive, send)

    wrapped = UsageGuardMiddleware(bare, guard=guard.aio, identify=from_headers())
    client = client_for(wrapped)
    assert client.get("/", headers=ORG).text == "bare"
    assert guard.usage("acme").meters["api_calls"].used == 1
    assert lifespan == ["lifespan.startup"]  # the lifespan scope reached the app


def test_unknown_metrics_fail_when_the_middleware_is_built(guard: UsageGuard) -> None:
    with pytest.raises(ValueError, match="sms"):
        UsageGuardMiddleware(
            PlainTextResponse("x"), guard=guard, identify=from_headers(), meter="sms"
        )
    with pytest.raises(ValueError, match="sms"):
        UsageGuardMiddleware(
            PlainTextResponse("x"),
            guard=guard,
            identify=from_headers(),
            rules=[Rule("/", "sms")],
        )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"exclude": "/health"}, "a list of paths"),  # was read as '/', 'h', 'e', …
        ({"status_code": "429"}, "an HTTP error status"),  # refusals inside were charged
        ({"status_code": 200}, "an HTTP error status"),
    ],
)
def test_options_of_the_wrong_kind_fail_when_the_middleware_is_built(
    guard: UsageGuard, option: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        UsageGuardMiddleware(PlainTextResponse("x"), guard=guard, identify=from_headers(), **option)


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
def test_backend_outage_on_a_fail_closed_metric_is_a_503(
    redis_process: Any, client_for: Callable[..., TestClient], clock: Any
) -> None:
    guard = UsageGuard.from_url(
        redis_process.url,
        plans=PLANS,
        default_plan="free",
        clock=clock,
        timeout=0.2,
        on_backend_error={"api_calls": "deny"},
    )
    client = client_for(build_app(guard), guard)
    assert client.get("/", headers=ORG).status_code == 200
    redis_process.stop()
    down = client.get("/", headers=ORG)
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json"
    assert down.headers["retry-after"] == "5"
    assert down.json()["type"] == REDUCED_CAPACITY
    assert "ratelimit" not in down.headers
    guard.close()

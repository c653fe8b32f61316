"""The Flask extension: identify, api_calls, @metered views, the same 429."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, request

from usage_guard import InvalidUsage, Plan, UsageGuard, current_subject, metered
from usage_guard.asgi import Rule, from_headers
from usage_guard.flask import UsageGuardFlask
from usage_guard.problem import QUOTA_EXCEEDED

PLANS = {"free": Plan("free", {"api_calls": 3, "emails": 1, "ai_tokens": 100})}
ALICE = {"x-org-id": "acme", "x-user-id": "alice"}
NOVEMBER = 30 * 24 * 3600
UNTIL_DECEMBER = 15 * 24 * 3600 + 12 * 3600


@metered("emails")
def send_email() -> str:
    return "queued"


def build(guard: Any, **options: Any) -> tuple[Flask, UsageGuardFlask]:
    app = Flask(__name__)
    extension = UsageGuardFlask(guard=guard, identify=from_headers(), **options)
    extension.init_app(app)
    calls: list[str] = []

    @app.get("/")
    def index() -> Any:
        calls.append("/")
        who = current_subject()
        return {"org": who and who.org, "user": who and who.user}

    @app.post("/emails")
    def emails() -> Any:
        if request.headers.get("x-skip-view"):  # the extension's rule alone meters it
            return {"status": "metered"}
        return {"status": send_email()}

    @app.get("/health")
    def health() -> Any:
        return {"ok": True}

    app.config["calls"] = calls
    return app, extension


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def test_init_app_registers_once_and_is_found_in_extensions(guard: UsageGuard) -> None:
    app, extension = build(guard)
    assert app.extensions["usage_guard"] is extension
    extension.init_app(app)  # idempotent
    assert len(app.before_request_funcs[None]) == 1
    assert UsageGuardFlask(Flask("other"), guard=guard, identify=from_headers()).guard is guard


def test_identified_requests_count_api_calls_with_ratelimit_fields(guard: UsageGuard) -> None:
    app, _ = build(guard)
    client = app.test_client()
    response = client.get("/", headers=ALICE)
    assert response.json == {"org": "acme", "user": "alice"}
    assert response.headers["RateLimit-Policy"] == f'"api_calls";q=3;w={NOVEMBER}'
    assert response.headers["RateLimit"] == f'"api_calls";r=2;t={UNTIL_DECEMBER}'
    assert guard.usage("acme").meters["api_calls"].used == 1


def test_denied_request_never_reaches_the_view_and_gets_the_same_429(guard: UsageGuard) -> None:
    app, _ = build(guard)
    client = app.test_client()
    for _ in range(3):
        client.get("/", headers=ALICE)
    denied = client.get("/", headers=ALICE)
    assert denied.status_code == 429
    assert denied.headers["Content-Type"] == "application/problem+json"
    assert denied.headers["Retry-After"] == str(UNTIL_DECEMBER)
    assert denied.headers["RateLimit"] == f'"api_calls";r=0;t={UNTIL_DECEMBER}'
    assert denied.json is not None
    assert denied.json["type"] == QUOTA_EXCEEDED and denied.json["metric"] == "api_calls"
    assert app.config["calls"] == ["/", "/", "/"]
    assert guard.usage("acme").meters["api_calls"].used == 3


def test_metered_view_denial_is_a_429_naming_its_metric(guard: UsageGuard) -> None:
    app, _ = build(guard)
    client = app.test_client()
    assert client.post("/emails", headers=ALICE).json == {"status": "queued"}
    denied = client.post("/emails", headers=ALICE)
    assert denied.status_code == 429
    assert denied.json is not None
    assert (denied.json["metric"], denied.json["used"], denied.json["limit"]) == ("emails", 1, 1)
    assert denied.headers["RateLimit-Policy"] == f'"emails";q=1;w={NOVEMBER};ug-unit="emails"'


def test_anonymous_excluded_invalid_and_required_identity(guard: UsageGuard) -> None:
    app, _ = build(guard, exclude=["/health"])
    client = app.test_client()
    assert client.get("/").json == {"org": None, "user": None}
    assert client.get("/health", headers=ALICE).status_code == 200
    assert client.get("/", headers={"x-org-id": ""}).status_code == 400
    assert guard.usage("acme").meters["api_calls"].used == 0
    strict, _ = build(guard, require_identity=True)
    assert strict.test_client().get("/").status_code == 401


def test_the_async_guard_is_accepted_and_its_sync_side_used(guard: UsageGuard) -> None:
    app, extension = build(guard.aio)
    assert extension.guard is guard
    assert app.test_client().get("/", headers=ALICE).status_code == 200
    assert guard.usage("acme").meters["api_calls"].used == 1


# -- at par with the ASGI middleware: rules, application factories ----------------------


def test_rules_meter_their_metric_too_and_a_denial_names_it(guard: UsageGuard) -> None:
    app, _ = build(guard, rules=[Rule("/emails", "emails", methods=frozenset({"POST"}))])
    client = app.test_client()
    first = client.post("/emails", headers={**ALICE, "x-skip-view": "1"})
    assert first.status_code == 200
    assert '"emails"' in first.headers["RateLimit-Policy"]
    assert client.get("/", headers=ALICE).status_code == 200  # the rule is POST /emails only
    denied = client.post("/emails", headers=ALICE)
    assert denied.status_code == 429 and denied.json is not None
    assert denied.json["metric"] == "emails"
    usage = guard.usage("acme")
    assert (usage.meters["emails"].used, usage.meters["api_calls"].used) == (1, 2)


def test_an_application_factory_reads_each_apps_options(
    make_guard: Callable[..., UsageGuard],
) -> None:
    usage = UsageGuardFlask(identify=from_headers())
    tight = make_guard(plans={"free": Plan("free", {"api_calls": 1})}, default_plan="free")
    loose = make_guard(plans=PLANS, default_plan="free")

    def create_app(**config: Any) -> Flask:
        app = Flask(__name__)
        app.config["USAGE_GUARD"] = config
        app.add_url_rule("/", "index", lambda: "ok")
        app.add_url_rule("/health", "health", lambda: "ok")
        return app

    first = create_app(guard=tight, exclude=["/health"])
    usage.init_app(first)
    second = create_app(guard=tight)
    usage.init_app(second, guard=loose)  # init_app's options win over app.config
    one, two = first.test_client(), second.test_client()
    assert [one.get("/", headers=ALICE).status_code for _ in range(2)] == [200, 429]
    assert one.get("/health", headers=ALICE).status_code == 200
    assert [two.get("/", headers=ALICE).status_code for _ in range(2)] == [200, 200]
    assert usage.metering(first).guard is tight and usage.metering(second).guard is loose


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "needs guard= and identify="),
        ({"identify": from_headers(), "guard": None, "exlude": ["/x"]}, "unknown"),
        ("guard=x", "must be a mapping"),
    ],
)
def test_bad_flask_options_are_named(guard: UsageGuard, config: Any, message: str) -> None:
    app = Flask(__name__)
    app.config["USAGE_GUARD"] = config
    with pytest.raises(InvalidUsage, match=message):
        UsageGuardFlask().init_app(app)


def test_a_streamed_body_meters_with_the_subject_bound(guard: UsageGuard) -> None:
    app, _ = build(guard)

    @app.get("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            for _ in range(2):
                yield send_email() + "\n"

        return app.response_class(chunks())

    guard.set_limit("acme", "emails", 10)
    assert app.test_client().get("/stream", headers=ALICE).text == "queued\nqueued\n"
    assert guard.usage("acme").meters["emails"].used == 2

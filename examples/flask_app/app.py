"""Example: the CRM-style service of ``examples/fastapi_app`` written with Flask.

Run it: ``flask --app examples.flask_app.app run`` or
``gunicorn -w 3 examples.flask_app.app:app`` (``memory://`` by default;
``USAGE_GUARD_URL=redis://…`` to share limits between workers, ``USAGE_GUARD_PREFIX``
to change the key prefix). Callers identify with ``X-Org-Id`` / ``X-User-Id``
headers: DEMO ONLY, a real service takes them from its authentication. The Usage
page is at ``/settings/usage/``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, abort, request

from usage_guard import Plan, UsageGuard, current_subject, metered
from usage_guard.asgi import from_headers
from usage_guard.demo import demo_admin, demo_identity
from usage_guard.flask import UsageGuardFlask, usage_blueprint

PLANS = {
    "free": Plan(
        "free",
        {
            "ai_tokens": 50_000,
            "emails": 100,
            "import_rows": 1_000,
            "contacts": 1_000,
            "api_calls": 10_000,
        },
    ),
    "pro": Plan(
        "pro",
        {
            "ai_tokens": 1_000_000,
            "emails": 20_000,
            "import_rows": 100_000,
            "contacts": 50_000,
            "api_calls": 1_000_000,
        },
    ),
}


def default_guard() -> UsageGuard:
    return UsageGuard.from_url(
        os.environ.get("USAGE_GUARD_URL", "memory://"),
        prefix=os.environ.get("USAGE_GUARD_PREFIX", "ug"),
        plans=PLANS,
        default_plan="free",
        on_backend_error={"ai_tokens": "deny"},
    )


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


@metered(
    "ai_tokens",
    amount=lambda prompt, max_tokens: len(prompt.split()) + max_tokens,
    cost=lambda completion: completion.tokens,
)
def complete(prompt: str, max_tokens: int) -> Completion:
    """A stand-in for an LLM call: the reply is shorter than max_tokens, as real ones are."""
    if not prompt.strip():
        raise ValueError("empty prompt")
    words = prompt.split()
    reply = " ".join(reversed(words))[:max_tokens]
    return Completion(reply, len(words) + len(reply.split()))


@metered("emails")
def send_email(to: str, subject: str) -> dict[str, str]:
    return {"status": "queued", "to": to}


@dataclass
class ContactBook:
    """Contacts per org in process memory: the app's own data, not usage_guard's."""

    by_org: dict[str, dict[int, dict[str, str]]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @metered("contacts")
    def add(self, org: str, contact: dict[str, str]) -> int:
        contact_id = next(self.ids)
        self.by_org.setdefault(org, {})[contact_id] = contact
        return contact_id

    def add_many(self, org: str, contacts: list[dict[str, str]]) -> None:
        for contact in contacts:
            self.by_org.setdefault(org, {})[next(self.ids)] = contact

    def remove(self, org: str, contact_id: int) -> bool:
        return self.by_org.get(org, {}).pop(contact_id, None) is not None


def create_app(guard: UsageGuard | None = None) -> Flask:
    guard = guard or default_guard()
    book = ContactBook()
    app = Flask(__name__)
    UsageGuardFlask(
        app,
        guard=guard,
        identify=from_headers("x-org-id", "x-user-id"),
        exclude=("/health", "/settings/usage*"),
    )
    # The Usage page. DEMO ONLY: a visitor without headers is acme's admin alice.
    app.register_blueprint(
        usage_blueprint(guard, identify=demo_identity(), is_admin=demo_admin()),
        url_prefix="/settings/usage",
    )

    def org() -> str:
        who = current_subject()
        if who is None:
            abort(401)
        return who.org

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    def fields(*names: str) -> dict[str, Any]:
        """The request's JSON object with these string fields, or a 422 (abort)."""
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not all(isinstance(body.get(n), str) for n in names):
            abort(422, f"send a JSON object with {', '.join(names)}")
        return body

    @app.post("/v1/ai/complete")
    def ai_complete() -> Any:
        org()
        body = fields("prompt")
        max_tokens = body.get("max_tokens", 256)
        if type(max_tokens) is not int or not 1 <= max_tokens <= 100_000:
            return {"detail": "max_tokens must be from 1 to 100,000"}, 422
        try:
            completion = complete(body["prompt"], max_tokens)
        except ValueError as error:
            return {"detail": str(error)}, 422
        return {"text": completion.text, "tokens": completion.tokens}

    @app.post("/v1/emails")
    def email() -> Any:
        org()
        body = fields("to", "subject")
        return send_email(body["to"], body["subject"])

    @app.post("/v1/imports")
    def import_contacts() -> Any:
        org_id = org()
        contacts = list(csv.DictReader(io.StringIO(request.get_data(as_text=True))))
        who = current_subject()
        user = None if who is None else who.user
        # One import adds rows and contacts at once: both fit or nothing is counted.
        amounts = {"import_rows": len(contacts), "contacts": len(contacts)}
        guard.consume(org_id, amounts, user=user).raise_for_status()
        book.add_many(org_id, contacts)
        return {"imported": len(contacts)}

    @app.post("/v1/contacts")
    def create_contact() -> Any:
        return {"id": book.add(org(), request.get_json())}, 201

    @app.delete("/v1/contacts/<int:contact_id>")
    def delete_contact(contact_id: int) -> Any:
        org_id = org()
        if not book.remove(org_id, contact_id):
            abort(404)
        guard.release(org_id, "contacts", 1)
        return "", 204

    return app


app = create_app()

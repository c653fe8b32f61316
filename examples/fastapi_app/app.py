"""Example: a CRM-style FastAPI service whose plan limits usage_guard enforces.

Run it: ``uvicorn examples.fastapi_app.app:app`` (``memory://`` by default;
``USAGE_GUARD_URL=redis://127.0.0.1:6379/0`` for Redis, ``USAGE_GUARD_PREFIX``
to change the key prefix). Callers identify with ``X-Org-Id`` / ``X-User-Id``
headers: DEMO ONLY, a real service takes them from its authentication.

- ``POST /v1/ai/complete``: AI tokens, reserve-then-settle (estimate = max_tokens,
  settled to the tokens really used; a failed completion cancels).
- ``POST /v1/emails``: a sync ``def`` endpoint metered by a dependency.
- ``POST /v1/imports``: a CSV import adding import rows and contacts all or nothing.
- ``POST /v1/contacts`` / ``DELETE /v1/contacts/{id}``: the cumulative contacts meter.
- every identified request also counts one API call.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field

from usage_guard import Plan, Unidentified, UsageGuard, current_subject, metered
from usage_guard.asgi import from_headers
from usage_guard.demo import mount_usage_page
from usage_guard.fastapi import install, require

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


ORG_ID = "DEMO ONLY: the caller's organization (a real service authenticates it)."
#: One id: a comma would say the header was sent twice (usage_guard refuses it, a 400).
ONE_ID = r"^[^,]+$"


def default_guard() -> UsageGuard:
    return UsageGuard.from_url(
        os.environ.get("USAGE_GUARD_URL", "memory://"),
        prefix=os.environ.get("USAGE_GUARD_PREFIX", "ug"),
        plans=PLANS,
        default_plan="free",
        # AI spend fails closed when Redis is down; everything else fails open.
        on_backend_error={"ai_tokens": "deny"},
    )


class ModelError(Exception):
    """The model provider failed."""


class CompletionRequest(BaseModel):
    prompt: str = Field(pattern=r"\S", description="Not blank.")
    max_tokens: int = Field(256, ge=1, le=4096)

    def prompt_tokens(self) -> int:
        return len(self.prompt.split())


class Completion(BaseModel):
    text: str
    tokens: int


class Email(BaseModel):
    to: str
    subject: str


class Contact(BaseModel):
    name: str
    email: str


@metered(
    "ai_tokens",
    amount=lambda request: request.prompt_tokens() + request.max_tokens,
    cost=lambda completion: completion.tokens,
)
async def complete(request: CompletionRequest) -> Completion:
    """A stand-in for an LLM call: the reply is shorter than max_tokens, as real ones are;
    the prompt "fail" fails, as a model provider sometimes does."""
    if request.prompt.strip() == "fail":
        raise ModelError("the model provider failed")
    words = request.prompt.split()
    reply = " ".join(reversed(words))[: request.max_tokens]
    return Completion(text=reply, tokens=len(words) + len(reply.split()))


@dataclass
class ContactBook:
    """Contacts per org in process memory: the app's own data, not usage_guard's."""

    by_org: dict[str, dict[int, Contact]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @metered("contacts")
    async def add(self, org: str, contact: Contact) -> int:
        contact_id = next(self.ids)
        self.by_org.setdefault(org, {})[contact_id] = contact
        return contact_id

    def add_many(self, org: str, contacts: list[Contact]) -> None:
        for contact in contacts:
            self.by_org.setdefault(org, {})[next(self.ids)] = contact

    def remove(self, org: str, contact_id: int) -> bool:
        return self.by_org.get(org, {}).pop(contact_id, None) is not None


def create_app(guard: UsageGuard | None = None) -> FastAPI:
    guard = guard or default_guard()
    book = ContactBook()
    app = FastAPI(title="usage_guard FastAPI example")
    install(
        app,
        guard=guard,
        identify=from_headers("x-org-id", "x-user-id"),
        exclude=("/health", "/settings/usage*", "/docs", "/openapi.json"),
    )
    mount_usage_page(app, guard)

    def org(
        x_org_id: Annotated[str, Header(pattern=ONE_ID, max_length=256, description=ORG_ID)],
        x_user_id: Annotated[str | None, Header(pattern=ONE_ID, max_length=256)] = None,
    ) -> str:
        # The middleware identified the caller from these headers; declared here so that
        # the OpenAPI schema tells clients to send them.
        who = current_subject()
        if who is None:
            raise Unidentified("send X-Org-Id")  # a 401 problem, as install() documents
        return who.org

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/ai/complete", responses={502: {"description": "The model failed."}})
    async def ai_complete(body: CompletionRequest, org_id: str = Depends(org)) -> Completion:
        try:
            return await complete(body)
        except ModelError as error:  # its reservation was cancelled: nothing is charged
            raise HTTPException(502, str(error)) from error

    @app.post("/v1/emails", dependencies=[Depends(require("emails", guard=guard))])
    def send_email(email: Email, org_id: str = Depends(org)) -> dict[str, str]:
        # A sync endpoint: FastAPI runs it in its threadpool; the quota was taken by the dependency.
        return {"status": "queued", "to": email.to}

    @app.post("/v1/imports")
    async def import_contacts(request: Request, org_id: str = Depends(org)) -> dict[str, int]:
        rows = list(csv.DictReader(io.StringIO((await request.body()).decode())))
        contacts = [Contact(name=row["name"], email=row["email"]) for row in rows]
        who = current_subject()
        user = None if who is None else who.user
        # One import adds rows and contacts at once: both fit or nothing is counted.
        amounts = {"import_rows": len(contacts), "contacts": len(contacts)}
        (await guard.aio.consume(org_id, amounts, user=user)).raise_for_status()
        book.add_many(org_id, contacts)
        return {"imported": len(contacts)}

    @app.post("/v1/contacts", status_code=201)
    async def create_contact(contact: Contact, org_id: str = Depends(org)) -> dict[str, int]:
        return {"id": await book.add(org_id, contact)}

    @app.delete(
        "/v1/contacts/{contact_id}",
        status_code=204,
        responses={404: {"description": "No such contact in this organization."}},
    )
    async def delete_contact(contact_id: int, org_id: str = Depends(org)) -> None:
        if not book.remove(org_id, contact_id):
            raise HTTPException(404, "no such contact")
        await guard.aio.release(org_id, "contacts", 1)

    return app


app = create_app()

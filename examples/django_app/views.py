"""The CRM-style API of ``examples/fastapi_app``, as Django views.

- ``POST /v1/ai/complete``: an async view; AI tokens reserved then settled by ``@metered``.
- ``POST /v1/emails``: a sync view; one email by ``@metered``.
- ``POST /v1/contacts`` / ``DELETE /v1/contacts/<id>``: the cumulative contacts meter.
- every identified request also counts one API call (the middleware).

Run it: ``python examples/django_app/manage.py runserver``,
``gunicorn examples.django_app.wsgi:application`` or
``uvicorn examples.django_app.asgi:application`` (``memory://`` by default;
``USAGE_GUARD_URL=redis://…`` to share limits between workers). The API
authenticates by headers, not cookies, so it is exempt from CSRF; the Usage page at
``/settings/usage/`` is not.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from usage_guard import Unidentified, current_subject, metered

from . import usage

_contact_ids = itertools.count(1)
#: Contacts per org in process memory: the app's own data, not usage_guard's.
_contacts: dict[str, dict[int, dict[str, Any]]] = {}


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


@metered(
    "ai_tokens",
    amount=lambda prompt, max_tokens: len(prompt.split()) + max_tokens,
    cost=lambda completion: completion.tokens,
)
async def complete(prompt: str, max_tokens: int) -> Completion:
    """A stand-in for an LLM call: the reply is shorter than max_tokens, as real ones are."""
    words = prompt.split()
    reply = " ".join(reversed(words))[:max_tokens]
    return Completion(reply, len(words) + len(reply.split()))


@metered("emails")
def queue_email(to: str) -> dict[str, str]:
    return {"status": "queued", "to": to}


@metered("contacts")
def add_contact(org: str, contact: dict[str, Any]) -> int:
    contact_id = next(_contact_ids)
    _contacts.setdefault(org, {})[contact_id] = contact
    return contact_id


def _org() -> str:
    who = current_subject()
    if who is None:
        raise Unidentified("send X-Org-Id")  # a 401 problem, answered by the middleware
    return who.org


def _json(request: HttpRequest) -> dict[str, Any] | None:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


@csrf_exempt
@require_POST
async def ai_complete(request: HttpRequest) -> HttpResponse:
    _org()
    body = _json(request)
    if body is None or not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return JsonResponse({"detail": "send a JSON object with a non-empty prompt"}, status=422)
    max_tokens = body.get("max_tokens", 256)
    if type(max_tokens) is not int or not 1 <= max_tokens <= 100_000:
        return JsonResponse({"detail": "max_tokens must be from 1 to 100,000"}, status=422)
    completion = await complete(body["prompt"], max_tokens)
    return JsonResponse({"text": completion.text, "tokens": completion.tokens})


@csrf_exempt
@require_POST
def send_email(request: HttpRequest) -> HttpResponse:
    _org()
    body = _json(request)
    if body is None or not isinstance(body.get("to"), str):
        return JsonResponse({"detail": "send a JSON object with a recipient in to"}, status=422)
    return JsonResponse(queue_email(body["to"]))


@csrf_exempt
@require_POST
def create_contact(request: HttpRequest) -> HttpResponse:
    org = _org()
    body = _json(request)
    if body is None:
        return JsonResponse({"detail": "send a JSON object"}, status=422)
    return JsonResponse({"id": add_contact(org, body)}, status=201)


@csrf_exempt
@require_http_methods(["DELETE"])
def delete_contact(request: HttpRequest, contact_id: int) -> HttpResponse:
    org = _org()
    if _contacts.get(org, {}).pop(contact_id, None) is None:
        return JsonResponse({"detail": "no such contact"}, status=404)
    usage.guard.release(org, "contacts", 1)
    return HttpResponse(status=204)

"""FastAPI: ``Depends(require("ai_tokens", 1))`` and :func:`install` (middleware, 429, OpenAPI).

::

    app = FastAPI()
    install(app, guard=guard, identify=from_headers())

    @app.post("/v1/enrich", dependencies=[Depends(require("enrichments"))])
    def enrich() -> dict[str, str]: ...        # sync endpoints work: the check runs async

The dependency answers with the metered subject's :class:`~usage_guard.Decision`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .aio import AsyncUsageGuard
from .asgi import UsageGuardMiddleware
from .context import AnyGuard
from .errors import InvalidUsage, Unidentified, UsageLimitExceeded
from .problem import PROBLEM_JSON, QUOTA_EXCEEDED, answer
from .requirement import Requirement, require
from .web import ExcludedPaths, Identify

__all__ = [
    "INVALID_IDENTITY_RESPONSE",
    "QUOTA_RESPONSE",
    "UNAUTHORIZED_RESPONSE",
    "UNAVAILABLE_RESPONSE",
    "Requirement",
    "install",
    "require",
]

#: The OpenAPI description of the 429 the dependency can answer.
QUOTA_RESPONSE: dict[str, Any] = {
    "description": "A usage limit or personal budget is exhausted (RFC 9457 problem).",
    "headers": {
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds until reset."},
        "RateLimit-Policy": {"schema": {"type": "string"}},
        "RateLimit": {"schema": {"type": "string"}},
    },
    "content": {
        PROBLEM_JSON: {
            "schema": {
                "type": "object",
                "required": ["type", "title", "status", "detail", "metric", "scope"],
                "properties": {
                    "type": {"type": "string", "example": QUOTA_EXCEEDED},
                    "title": {"type": "string"},
                    "status": {"type": "integer", "example": 429},
                    "detail": {"type": "string"},
                    "violated-policies": {"type": "array", "items": {"type": "string"}},
                    "metric": {"type": "string"},
                    "scope": {"type": "string", "enum": ["organization", "personal", "rate"]},
                    "limit": {"type": ["integer", "null"]},
                    "used": {"type": "integer"},
                    "resets_at": {"type": ["string", "null"], "format": "date-time"},
                },
            }
        }
    },
}


def _problem(description: str, status: int) -> dict[str, Any]:
    """The OpenAPI description of an RFC 9457 problem answer."""
    return {
        "description": description,
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer", "example": status},
                        "detail": {"type": "string"},
                    },
                }
            }
        },
    }


#: What the middleware answers a request whose organization or user id it cannot accept
#: (a problem), and FastAPI one whose body it cannot parse (``{"detail": ...}``).
_INVALID = _problem(
    "The organization or user id is not valid (or, from FastAPI, the body is not).", 400
)
INVALID_IDENTITY_RESPONSE = {
    **_INVALID,
    "content": {
        **_INVALID["content"],
        "application/json": {
            "schema": {"type": "object", "properties": {"detail": {"type": "string"}}}
        },
    },
}
#: An anonymous request where an identity is needed (``require_identity``, ``require()``).
UNAUTHORIZED_RESPONSE = _problem("This request needs an identified organization.", 401)
#: Redis is down and a metric of the request fails closed.
UNAVAILABLE_RESPONSE = {
    **_problem("Usage cannot be checked now and this metric fails closed.", 503),
    "headers": {
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds before retrying."}
    },
}


def install(app: FastAPI, *, guard: AnyGuard, identify: Identify, **options: Any) -> None:
    """Add :class:`UsageGuardMiddleware` (``options`` are its keywords) and the problem
    handlers for errors raised in endpoints, and document in the OpenAPI schema what the
    guard may answer on each route it does not exclude: the 400 of an id it cannot
    accept, the 401 of metered code reached anonymously, the 429, and the 503 when a
    metric fails closed."""
    app.add_middleware(UsageGuardMiddleware, guard=guard, identify=identify, **options)
    aguard = guard if isinstance(guard, AsyncUsageGuard) else guard.aio
    status = options.get("status_code", 429)

    async def problem_response(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, (UsageLimitExceeded, Unidentified, InvalidUsage))
        problem = answer(exc, aguard.catalog, aguard.calls.clock(), status=status)
        headers = dict(problem.headers)
        return Response(problem.body, status_code=problem.status, headers=headers)

    for error in (UsageLimitExceeded, Unidentified, InvalidUsage):
        app.add_exception_handler(error, problem_response)
    # Metered code (@metered, require(), guard calls) may run on any route the middleware
    # does not exclude: each may answer what the guard answers.
    answers = {
        "400": INVALID_IDENTITY_RESPONSE,
        "401": UNAUTHORIZED_RESPONSE,
        str(status): QUOTA_RESPONSE,
    }
    if aguard.runtime.deny_on_backend_error:
        answers["503"] = UNAVAILABLE_RESPONSE
    _document(app, ExcludedPaths(options.get("exclude", ())), answers)


def _document(app: FastAPI, exclude: ExcludedPaths, answers: dict[str, dict[str, Any]]) -> None:
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for route in app.routes:
            if not isinstance(route, APIRoute) or route.path_format in exclude:
                continue
            operations = schema.get("paths", {}).get(route.path_format, {})
            for method in route.methods or ():
                operation = operations.get(method.lower())
                if operation is not None:
                    responses = operation.setdefault("responses", {})
                    for code, response in answers.items():
                        responses.setdefault(code, response)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

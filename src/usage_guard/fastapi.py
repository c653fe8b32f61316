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
from .web import Identify

__all__ = ["QUOTA_RESPONSE", "Requirement", "install", "require"]

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
                    "limit": {"type": "integer", "nullable": True},
                    "used": {"type": "integer"},
                    "resets_at": {"type": "string", "format": "date-time", "nullable": True},
                },
            }
        }
    },
}


def install(app: FastAPI, *, guard: AnyGuard, identify: Identify, **options: Any) -> None:
    """Add :class:`UsageGuardMiddleware` (``options`` are its keywords), the 429 handler for
    ``UsageLimitExceeded`` raised in endpoints, and the 429 in the OpenAPI schema of every
    route that depends on :func:`require`."""
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
    _document_quota_responses(app, str(status))


def _document_quota_responses(app: FastAPI, status: str) -> None:
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for route in app.routes:
            if isinstance(route, APIRoute) and _requires_quota(route.dependant):
                operations = schema.get("paths", {}).get(route.path_format, {})
                for method in route.methods or ():
                    operation = operations.get(method.lower())
                    if operation is not None:
                        operation.setdefault("responses", {}).setdefault(status, QUOTA_RESPONSE)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _requires_quota(dependant: Any) -> bool:
    return any(
        isinstance(sub.call, Requirement) or _requires_quota(sub) for sub in dependant.dependencies
    )

"""The Usage page as a Django view: :class:`~usage_guard.dashboard.page.UsagePage`
on the guard's sync side, behind Django's own CSRF protection (its forms carry the token)."""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from django.middleware.csrf import get_token

from ..dashboard.page import TOO_LARGE, PageRequest
from .conf import configuration
from .middleware import problem_response


def usage(request: HttpRequest, path: str = "") -> HttpResponse:
    """``GET /``, ``/report.json`` and the admin endpoints below where the URLs are included."""
    try:
        body = request.body
    except RawPostDataException:  # multipart, already parsed by Django: the page answers 415
        body = b""
    except RequestDataTooBig:  # over DATA_UPLOAD_MAX_MEMORY_SIZE
        return problem_response(TOO_LARGE)
    full = request.path
    answer = configuration().page.respond(
        PageRequest(
            method=request.method or "GET",
            path="/" + path,
            page=full[: len(full) - len(path)],
            headers=request.headers,
            body=body,
            native=request,
            form_fields={"csrfmiddlewaretoken": get_token(request)}
            if request.method == "GET"
            else {},
        )
    )
    return HttpResponse(answer.body, status=answer.status, headers=dict(answer.headers))

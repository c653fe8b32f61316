"""Cross-site request forgery: which state-changing requests the Usage page accepts.

Browsers attach an admin's cookies to requests that other sites make them send:
a ``<form>`` (``application/x-www-form-urlencoded``, ``multipart/form-data`` or
``text/plain``) or a ``no-cors`` ``fetch`` reach the server without any CORS
preflight. Browsers also say where such a request came from (``Origin``,
``Sec-Fetch-Site``), and only scripts may send ``application/json``
cross-site, after a preflight that this library never grants. So a
state-changing request is accepted only when

* its ``Origin`` is a configured trusted origin, or
* its ``Sec-Fetch-Site`` says ``same-origin`` (or ``none``: typed by the user), or
* without ``Sec-Fetch-Site`` (older browsers), its ``Origin`` is the request's own host, or
* with neither header (a script, not a browser), its body is ``application/json``;

and its body, if any, is JSON or an HTML form. The check is framework-free:
every framework's Usage page calls :func:`refusal` with the request's method
and headers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit

from .errors import InvalidUsage
from .problem import Problem, client_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


class Headers(Protocol):
    """Case-insensitive header access, as Starlette, Werkzeug and Django offer it."""

    def get(self, key: str, /) -> str | None: ...


def trusted(origins: Iterable[str]) -> frozenset[str]:
    """Validate ``trusted_origins`` (``"https://app.example.com"``) into lowercase origins."""
    if isinstance(origins, str):
        raise InvalidUsage("trusted_origins must be a list of origins, not one string")
    normalized = set()
    for origin in origins:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or not _normalized(origin)
        ):
            raise InvalidUsage(f"trusted origin {origin!r} must look like https://host[:port]")
        normalized.add(_normalized(origin))
    return frozenset(normalized)


def media_type(headers: Headers) -> str:
    return (headers.get("content-type") or "").split(";")[0].strip().lower()


def refusal(method: str, headers: Headers, trusted_origins: frozenset[str]) -> Problem | None:
    """``None`` when the request may change state, else the answer: a 403 (cross-site) or
    a 415 (a body that is not JSON or a form)."""
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    media = media_type(headers)
    if origin is not None and _normalized(origin) in trusted_origins:
        pass  # a front end the application trusts, wherever it is served from
    elif site is not None:
        # Scripts cannot forge it, and it survives Referrer-Policy: no-referrer, under
        # which browsers send "Origin: null" even with the page's own forms.
        if site.lower() not in ("same-origin", "none"):
            return _CROSS_SITE
    elif origin is not None:
        if not _same_host(origin, headers.get("host")):
            return _CROSS_SITE
    elif media != JSON and (method.upper() == "POST" or _has_body(headers)):
        return client_error(
            403,
            "Forbidden",
            "a request without Origin or Sec-Fetch-Site must send application/json",
        )
    if media not in (JSON, FORM) and (media or _has_body(headers)):
        return client_error(
            415,
            "Unsupported Media Type",
            "send application/json, or an HTML form (application/x-www-form-urlencoded)",
        )
    return None


_CROSS_SITE = client_error(403, "Forbidden", "cross-site requests cannot change usage settings")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalized(origin: str) -> str:
    """``scheme://host[:port]`` in lowercase, without the scheme's default port."""
    parts = urlsplit(origin.strip().lower())
    try:
        port = parts.port
    except ValueError:
        return ""
    if parts.hostname is None:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def _same_host(origin: str, host: str | None) -> bool:
    """Whether ``origin`` names the host the request was sent to (``null`` never does).

    The scheme is not compared: behind a proxy that ends TLS the app may see ``http``
    while browsers say ``https``."""
    if host is None:
        return False
    normalized = _normalized(origin)
    scheme = normalized.partition("://")[0]
    return bool(normalized) and normalized == _normalized(f"{scheme}://{host}")


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return headers.get("transfer-encoding") is not None or (
        length is not None and length.strip() not in ("", "0")
    )

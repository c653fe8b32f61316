"""What every HTTP integration shares (ASGI, FastAPI, Flask, the Usage page): who a
request is (identity helpers) and what it meters (excluded paths, route rules).
Their answers, problem+json and RateLimit fields, are :mod:`usage_guard.problem`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from starlette.routing import compile_path
from starlette.types import Scope

from .catalog import Catalog
from .errors import InvalidIdentifier, InvalidUsage
from .plans import check_value
from .subject import Subject

Identity = Subject | None
Identify = Callable[[Any], Identity | Awaitable[Identity]]


class from_headers:
    """Identify by request headers (``X-Org-Id`` / ``X-User-Id`` by default).

    Trust client-supplied headers only behind a gateway that sets them. Works
    with Starlette, Flask and Django requests, and reads the raw ASGI scope in the middleware.
    A header sent twice (or holding a comma, which is how WSGI servers join repeated
    headers) is refused with :class:`~usage_guard.InvalidIdentifier`: a 400.
    """

    def __init__(self, org: str = "x-org-id", user: str | None = "x-user-id") -> None:
        self.org = org.lower()
        self.user = None if user is None else user.lower()
        self._org_raw = self.org.encode("latin-1")
        self._user_raw = None if self.user is None else self.user.encode("latin-1")

    def __call__(self, request: Any) -> Identity:
        headers = request.headers
        org = _single(_values(headers, self.org), self.org)
        if org is None:
            return None
        user = None if self.user is None else _single(_values(headers, self.user), self.user)
        return Subject(org, user)

    def from_scope(self, scope: Scope) -> Identity:
        org = user = None
        for name, value in scope["headers"]:
            if name == self._org_raw:
                if org is not None or b"," in value:
                    raise _duplicate(self.org)
                org = value
            elif name == self._user_raw:
                if user is not None or b"," in value:
                    raise _duplicate(self.user)
                user = value
        return None if org is None else _subject_of(org, user)


def _values(headers: Any, name: str) -> list[str]:
    """Every value of a header: Starlette and Werkzeug list them; Django's WSGI and ASGI
    handlers have already joined them with commas."""
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    value = headers.get(name)
    return [] if value is None else [value]


def _single(values: list[str], name: str) -> str | None:
    if len(values) > 1 or (values and "," in values[0]):
        raise _duplicate(name)
    return values[0] if values else None


def _duplicate(name: str | None) -> InvalidIdentifier:
    # A gateway that appends instead of replacing: which org to charge is ambiguous. WSGI
    # servers join repeated headers with commas (as HTTP allows), so a comma says the same.
    return InvalidIdentifier(f"the request carries {name} more than once")


@lru_cache(maxsize=4096)
def _subject_of(org: bytes, user: bytes | None) -> Subject:
    """The Subject of raw header values: the same few callers come again and again."""
    return Subject(org.decode("latin-1"), None if user is None else user.decode("latin-1"))


class from_state:
    """Identify by attributes an authentication middleware set on ``request.state``."""

    def __init__(self, org: str = "org_id", user: str | None = "user_id") -> None:
        self.org = org
        self.user = user

    def __call__(self, request: Any) -> Identity:
        return self.from_scope(request.scope)

    def from_scope(self, scope: Scope) -> Identity:
        return self._subject(scope.get("state") or {})

    def _subject(self, state: Mapping[str, Any]) -> Identity:
        org = state.get(self.org)
        if org is None:
            return None
        return Subject(org, None if self.user is None else state.get(self.user))


class ExcludedPaths:
    """Paths an integration never meters: exact ones, and prefixes written with a trailing ``*``."""

    def __init__(self, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str):
            raise InvalidUsage(f"exclude must be a list of paths, not one string: [{patterns!r}]")
        patterns = tuple(patterns)
        if not all(isinstance(pattern, str) for pattern in patterns):
            raise InvalidUsage(f"exclude must hold paths as strings, not {patterns!r}")
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def __contains__(self, path: str) -> bool:
        return path in self.exact or bool(self.prefixes and path.startswith(self.prefixes))


@dataclass(frozen=True)
class Rule:
    """Meter ``amount`` of ``metric`` on requests whose path matches ``path``.

    ``path`` uses Starlette's route syntax (``/contacts/{id}``, ``/files/{rest:path}``);
    ``methods`` limits the rule to some methods (all when empty).
    """

    path: str
    metric: str
    amount: int = 1
    methods: frozenset[str] = field(default_factory=frozenset)
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        object.__setattr__(self, "pattern", compile_path(self.path)[0])

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and bool(self.pattern.match(path))


class Metering:
    """What each identified request consumes: ``amount`` of ``meter`` (none when
    ``meter`` is None), plus the metric of every :class:`Rule` its route matches."""

    def __init__(
        self, catalog: Catalog, meter: str | None, amount: int, rules: Iterable[Rule]
    ) -> None:
        if meter is not None:
            catalog.require(meter)
        check_value(amount)
        self.rules = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise InvalidUsage(f"rules must be usage_guard.asgi.Rule objects, not {rule!r}")
            catalog.require(rule.metric)
            check_value(rule.amount)
        #: What every identified request consumes before rules add theirs (never mutated).
        self.base: Mapping[str, int] = MappingProxyType({} if meter is None else {meter: amount})

    def amounts(self, method: str, path: str) -> Mapping[str, int]:
        if not self.rules:
            return self.base
        amounts = dict(self.base)
        for rule in self.rules:
            if rule.matches(method, path):
                amounts[rule.metric] = amounts.get(rule.metric, 0) + rule.amount
        return amounts


def close_unawaited(awaitable: object) -> None:
    """Close a coroutine a sync caller got and refuses, so that it does not warn as well."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


def checked_status(status_code: object) -> int:
    """The status a denial is answered with: an HTTP client error or server error code."""
    if type(status_code) is not int or not 400 <= status_code <= 599:
        raise InvalidUsage(
            f"status_code must be an HTTP error status (400-599), not {status_code!r}"
        )
    return status_code

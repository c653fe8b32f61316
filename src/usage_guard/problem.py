"""The HTTP answer to a denied consumption, shared by every integration.

An RFC 9457 ``application/problem+json`` body plus ``Retry-After`` and the
``RateLimit-Policy`` / ``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers-10.
Pure: the integrations only send what these functions build.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from .catalog import Catalog
from .decision import Decision
from .errors import InvalidUsage, Unidentified, UsageLimitExceeded
from .periods import Period, iso_utc

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
PROBLEM_JSON = "application/problem+json"
#: Seconds a client should wait before retrying while the usage store is unreachable.
OUTAGE_RETRY_AFTER = 5

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Problem:
    """A complete HTTP error answer: status, headers (content type included), body."""

    status: int
    headers: Headers
    body: bytes


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up, never negative."""
    return max(0, math.ceil((moment - now).total_seconds()))


def policy_fields(decision: Decision, catalog: Catalog, now: datetime) -> Headers:
    """``RateLimit-Policy`` and ``RateLimit`` for the decision's metric (none if unlimited).

    ``q`` is the most the binding budget admits, ``w`` the real length of the
    current month (absent for cumulative metrics), ``t`` the seconds until the
    reset (rounded up); every metric but ``api_calls`` names its unit in ``ug-unit``.
    """
    return [
        (name.decode(), value.decode())
        for name, value in raw_policy_fields(decision, catalog, now.timestamp())
    ]


def raw_policy_fields(
    decision: Decision, catalog: Catalog, now: float
) -> list[tuple[bytes, bytes]]:
    """:func:`policy_fields` as ASGI sends them, for ``now`` in seconds since the epoch:
    one policy per metric the call consumed (a list, as the draft allows), for the
    limited ones.

    Built on every admitted response, so everything but ``r`` and ``t`` is cached.
    """
    if not decision.others:
        return _fields(decision, catalog, now)
    policies: list[bytes] = []
    states: list[bytes] = []
    for each in (decision, *decision.others):
        for name, value in _fields(each, catalog, now):
            (policies if name == b"ratelimit-policy" else states).append(value)
    if not policies:
        return []
    return [(b"ratelimit-policy", b", ".join(policies)), (b"ratelimit", b", ".join(states))]


def _fields(decision: Decision, catalog: Catalog, now: float) -> list[tuple[bytes, bytes]]:
    quota = decision.quota
    if quota is None:
        return []
    policy, name, reset = _policy(
        decision.metric, catalog[decision.metric].unit, quota, decision.resets_at
    )
    # The true remaining, also on a denial: a request for more than is left is refused
    # while smaller ones would still pass.
    remaining = decision.remaining or 0
    if reset is None:
        return [(b"ratelimit-policy", policy), (b"ratelimit", b"%s;r=%d" % (name, remaining))]
    left = max(0, math.ceil(reset - now))
    return [
        (b"ratelimit-policy", policy),
        (b"ratelimit", b"%s;r=%d;t=%d" % (name, remaining, left)),
    ]


@lru_cache(maxsize=1024)
def _policy(
    metric: str, unit: str, quota: int, resets_at: datetime | None
) -> tuple[bytes, bytes, float | None]:
    """``RateLimit-Policy``, the quoted metric name and the reset as a timestamp: the same
    for every decision of a budget in a period (plain keys: hashing a Metric costs more
    than the build). ``w`` is the month's real length."""
    window = "" if resets_at is None else f";w={Period.containing(resets_at).shift(-1).seconds}"
    unit = f';ug-unit="{unit}"' if unit and metric != "api_calls" else ""
    reset = None if resets_at is None else resets_at.timestamp()
    return f'"{metric}";q={quota}{window}{unit}'.encode(), f'"{metric}"'.encode(), reset


def detail(decision: Decision, catalog: Catalog) -> str:
    """The sentence a person reads: what ran out (or what the request needed and what is
    left) and what to do about it."""
    label = catalog[decision.metric].label or decision.metric
    limit = "unlimited" if decision.limit is None else f"{decision.limit:,}"
    personal = decision.scope == "personal"
    ask_admin = " Contact your admin to increase your allocation." if personal else ""
    if decision.remaining:
        until = "" if decision.resets_at is None else f" until {_day(decision.resets_at)}"
        yours = "your " if personal else ""
        return (
            f"This request needs {decision.requested:,} {label}; "
            f"{decision.remaining:,} of {yours}{limit} remain{until}.{ask_admin}"
        )
    used = f"{decision.used:,} of {limit} used"
    if personal:
        return f"You have reached your personal {label} budget ({used}).{ask_admin}"
    if decision.resets_at is None:
        return (
            f"Your organization has reached its {label} limit ({used}). "
            "Free some up or ask an admin to upgrade the plan."
        )
    return (
        f"Your organization has reached its {label} limit for this month ({used}). "
        f"It resets at {iso_utc(decision.resets_at)}."
    )


def _day(moment: datetime) -> str:
    """``Dec 1``: when a period ends, as people say it."""
    return f"{moment:%b} {moment.day}"


def quota_exceeded(
    decision: Decision, catalog: Catalog, now: datetime, *, status: int = 429
) -> Problem:
    """The 429 (or ``status``) answer to a denied decision; a 503 for an outage denial."""
    if decision.scope == "unavailable":
        return unavailable()
    body = {
        "type": QUOTA_EXCEEDED,
        "title": "Usage limit exceeded",
        "status": status,
        "detail": detail(decision, catalog),
        "violated-policies": [decision.metric],
        "metric": decision.metric,
        "scope": decision.scope,
        "limit": decision.limit,
        "used": decision.used,
        "resets_at": None if decision.resets_at is None else iso_utc(decision.resets_at),
    }
    headers: Headers = [("content-type", PROBLEM_JSON)]
    if decision.resets_at is not None:
        headers.append(("retry-after", str(seconds_until(decision.resets_at, now))))
    headers += policy_fields(decision, catalog, now)
    return _problem(status, headers, body)


def rate_limited(
    metric: str, limit: int, window: int, retry_after: int, *, status: int = 429
) -> Problem:
    """The answer to a short-window rate limit (``limit`` per ``window`` seconds).

    Its policy is named ``<metric>-<window>s`` (``"api_calls-1s"``): a client tells it
    from the metric's monthly quota, named after the metric alone.
    """
    policy = f"{metric}-{window}s"
    body = {
        "type": QUOTA_EXCEEDED,
        "title": "Rate limit exceeded",
        "status": status,
        "detail": f"Too many requests: at most {limit:,} per {window} s. Retry in {retry_after} s.",
        "violated-policies": [policy],
        "metric": metric,
        "scope": "rate",
        "limit": limit,
        "used": limit,
        "resets_at": None,
    }
    headers: Headers = [
        ("content-type", PROBLEM_JSON),
        ("retry-after", str(retry_after)),
        ("ratelimit-policy", f'"{policy}";q={limit};w={window}'),
        ("ratelimit", f'"{policy}";r=0;t={retry_after}'),
    ]
    return _problem(status, headers, body)


def unavailable(retry_after: int = OUTAGE_RETRY_AFTER) -> Problem:
    """503: the usage store could not be asked and the metric fails closed."""
    body = {
        "type": REDUCED_CAPACITY,
        "title": "Usage metering temporarily unavailable",
        "status": 503,
        "detail": "Usage limits cannot be checked right now. Please retry shortly.",
    }
    headers = [("content-type", PROBLEM_JSON), ("retry-after", str(retry_after))]
    return _problem(503, headers, body)


def client_error(status: int, title: str, detail_text: str) -> Problem:
    """A plain problem (``about:blank``): 401 without identity, 400 for an invalid one."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail_text}
    return _problem(status, [("content-type", PROBLEM_JSON)], body)


class Refused(Exception):
    """Raised while handling a request to answer it with ``problem``."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.body.decode())
        self.problem = problem


def refused(status: int, title: str, detail_text: str) -> Refused:
    """``raise refused(422, "Invalid value", "...")``: a plain problem as an exception."""
    return Refused(client_error(status, title, detail_text))


#: What an application may let through, and every integration answers.
AnsweredError = UsageLimitExceeded | Unidentified | InvalidUsage


def answer(error: AnsweredError, catalog: Catalog, now: datetime, *, status: int = 429) -> Problem:
    """The client's answer to an error raised while handling its request: the 429 (or
    ``status``) of a denial, a 401 for metered code reached without an identity, a 422
    for a value from the request that the guard rejects (an amount from the body, an
    unknown metric): the client's input, not the server, was wrong."""
    if isinstance(error, UsageLimitExceeded):
        return quota_exceeded(error.decision, catalog, now, status=status)
    if isinstance(error, Unidentified):
        return UNIDENTIFIED
    return client_error(422, "Unprocessable Content", str(error))


def _problem(status: int, headers: Headers, body: dict[str, object]) -> Problem:
    encoded = json.dumps(body, separators=(",", ":")).encode()
    headers.append(("content-length", str(len(encoded))))
    return Problem(status, headers, encoded)


#: 401 for an anonymous request when an integration requires an identity.
UNAUTHORIZED = client_error(401, "Unauthorized", "This request needs an identity.")
#: 401 for metered code reached by a request that identified no organization.
UNIDENTIFIED = client_error(401, "Unauthorized", "This action needs an identified organization.")
#: 400 for an organization or user id that usage_guard cannot accept.
INVALID_IDENTITY = client_error(
    400, "Bad Request", "The organization or user id of this request is not valid."
)

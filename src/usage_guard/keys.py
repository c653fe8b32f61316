"""The Redis key layout and how ids are encoded into it. Pure.

Every key of one organization carries the hash tag ``{<org>}``, so one script
call reads and writes them atomically, on Redis Cluster too::

    ug:{acme}:org                          hash  plan, limit:<metric> overrides
    ug:{acme}:budgets                      hash  <user>:<metric> -> allocation
    ug:{acme}:c:<metric>:<YYYY-MM>         org counter of a monthly metric
    ug:{acme}:u:<user>:<metric>:<YYYY-MM>  personal counter of a monthly metric
    ug:{acme}:g:<metric>                   current value of a cumulative metric
    ug:{acme}:h:<metric>                   hash <YYYY-MM> -> last value of a cumulative metric
    ug:{acme}:t:<YYYY-MM>                  hash <metric> -> highest threshold event emitted
    ug:{acme}:idem:<key>                   an admitted idempotent consumption (24 h)
    ug:{acme}:reservations                 sorted set  open reservations by deadline (ms)
    ug:{acme}:held                         hash  <counter key without ug:{acme}:> -> estimates
                                                 held by open reservations
    ug:{acme}:r:<id>                       a reservation, until settled or cancelled
    ug:{acme}:rl:<metric>:<window>s        list  request times (ms) in a rate limit's window

Ids made of ASCII letters, digits and ``_ . - @`` appear unchanged; every
other byte of their UTF-8 form is percent-encoded (``%7B`` for ``{``), so no id
can break a hash tag or run into another id's keys.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

from .errors import InvalidIdentifier

MAX_ID_LENGTH = 256
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.@-]+")


def encode_id(value: str) -> str:
    """The form of an org/user/idempotency id inside keys (validated)."""
    if type(value) is not str:
        raise InvalidIdentifier(f"ids must be str, not {type(value).__name__}")
    return _encode(value)


@lru_cache(maxsize=65536)
def _encode(value: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifier(f"ids must have 1 to {MAX_ID_LENGTH} characters: {value[:40]!r}")
    if _PLAIN_ID.fullmatch(value):
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form, so no key could name it.
        raise InvalidIdentifier(f"ids must be valid Unicode text: {value[:40]!r}") from None
    return "".join(
        char if _PLAIN_ID.fullmatch(char) else "".join(f"%{b:02X}" for b in char.encode())
        for char in value
    )


def decode_id(encoded: str) -> str:
    """The inverse of :func:`encode_id`."""
    return unquote(encoded, errors="strict")


class KeySpace:
    """Builds the keys of one organization under a prefix (``ug`` by default)."""

    __slots__ = ("base", "budgets", "held", "org", "reservations")

    def __init__(self, prefix: str, org: str) -> None:
        self.base = f"{prefix}:{{{encode_id(org)}}}:"
        self.org = self.base + "org"
        self.budgets = self.base + "budgets"
        self.reservations = self.base + "reservations"
        self.held = self.base + "held"

    @staticmethod
    def of(prefix: str, org: str) -> KeySpace:
        """The same as ``KeySpace(prefix, org)``, built once per org (it is on every call)."""
        if type(org) is not str:
            encode_id(org)  # raises InvalidIdentifier, where the cache would raise TypeError
        return _cached_space(prefix, org)

    def counter(self, metric: str, period: str) -> str:
        return f"{self.base}c:{metric}:{period}"

    def personal(self, user_id: str, metric: str, period: str) -> str:
        return f"{self.base}u:{user_id}:{metric}:{period}"

    def gauge(self, metric: str) -> str:
        return f"{self.base}g:{metric}"

    def history(self, metric: str) -> str:
        return f"{self.base}h:{metric}"

    def thresholds(self, period: str) -> str:
        return f"{self.base}t:{period}"

    def idempotency(self, key: str) -> str:
        return f"{self.base}idem:{encode_id(key)}"

    def reservation(self, reservation_id: str) -> str:
        return f"{self.base}r:{reservation_id}"

    def rate(self, metric: str, window: int) -> str:
        return f"{self.base}rl:{metric}:{window}s"


_cached_space = lru_cache(maxsize=65536)(KeySpace)


def budget_field(user_id: str, metric: str) -> str:
    return f"{user_id}:{metric}"

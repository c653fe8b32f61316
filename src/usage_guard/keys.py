"""The Redis key layout and how ids are encoded into it. Pure.

Every key of one organization carries the hash tag ``{<org>}``, so one script call
reads and writes them atomically, on Redis Cluster too. An org's meters live in few
small hashes whose fields are the catalog's metric names::

    ug:{acme}:org              hash  plan, limit:<metric> overrides, reservations:due,
                                     <metric> -> current value of a cumulative metric
    ug:{acme}:budgets          hash  <user>:<metric> -> personal budget
    ug:{acme}:m:<YYYY-MM>      hash  <metric> -> the month's count of a monthly metric,
                                     or a cumulative metric's last value that month;
                                     t:<metric> -> highest threshold emitted (current
                                     month); s:<metric> -> the value a cumulative metric
                                     started the month with, after a month without one
    ug:{acme}:u:<YYYY-MM>      hash  <user>:<metric> -> personal count (current month)
    ug:{acme}:idem:<key>       string  an admitted idempotent consumption (24 h)
    ug:{acme}:reservations     sorted set  open reservations by deadline (ms)
    ug:{acme}:held             hash  <counter> -> estimates held by open reservations
                                     (a counter: m:<YYYY-MM>:<metric>,
                                     u:<YYYY-MM>:<user>:<metric> or org:<metric>)
    ug:{acme}:r:<id>           string  a reservation, until settled or cancelled
    ug:{acme}:rl:<metric>:<window>s  list  request times (ms) in a rate limit's window

Month hashes expire once they leave the history window; the org's hash and its
budgets never expire. Ids made of ASCII letters, digits and ``_ . - @`` appear
unchanged; every other byte of their UTF-8 form is percent-encoded (``%7B`` for
``{``), so no id can break a hash tag or run into another id's keys.
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

    def meters(self, period: str) -> str:
        """The hash of the org's meters in a month."""
        return f"{self.base}m:{period}"

    def personal(self, period: str) -> str:
        """The hash of a month's personal counts."""
        return f"{self.base}u:{period}"

    def idempotency(self, key: str) -> str:
        return f"{self.base}idem:{encode_id(key)}"

    def reservation(self, reservation_id: str) -> str:
        return f"{self.base}r:{reservation_id}"

    def rate(self, metric: str, window: int) -> str:
        return f"{self.base}rl:{metric}:{window}s"


_cached_space = lru_cache(maxsize=65536)(KeySpace)


def counter_id(key: str, field: str = "") -> str:
    """How ``held`` names a counter (see lua/_reservations.lua): its hash's key after the
    org's base, then ``:`` and its field; without a field, the prefix of that hash's
    counters. An encoded org id holds no ``}``, so the base ends at the first ``}:``."""
    return f"{key[key.index('}:') + 2 :]}:{field}"


def personal_field(user_id: str, metric: str) -> str:
    """A user's field in the budgets hash and in the personal counts' hashes."""
    return f"{user_id}:{metric}"

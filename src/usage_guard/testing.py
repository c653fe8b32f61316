"""A kit for an application's own tests: a guard on ``memory://`` whose clock the test
moves by hand, and helpers to reset an org and set its usage without going through
the caps. The pytest plugin (:mod:`usage_guard.pytest_plugin`) hands one out as the
``usage_guard`` fixture.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import InvalidUsage
from .guard import UsageGuard
from .keys import KeySpace, encode_id, personal_field
from .plans import check_value


class ManualClock:
    """A clock that follows the real one until a test freezes, sets or advances it;
    then it stays where it was put (UTC)."""

    def __init__(self) -> None:
        self._frozen: datetime | None = None

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) if self._frozen is None else self._frozen

    def freeze(self, at: datetime | None = None) -> datetime:
        """Stop the clock, now or at ``at`` (timezone-aware)."""
        if at is not None and at.tzinfo is None:
            raise InvalidUsage("the clock takes timezone-aware datetimes (tzinfo=timezone.utc)")
        self._frozen = self() if at is None else at.astimezone(timezone.utc)
        return self._frozen

    def set(
        self, year: int, month: int = 1, day: int = 1, hour: int = 0, minute: int = 0
    ) -> datetime:
        """Stop the clock at that moment, UTC: ``set(2026, 12, 1)`` is when December starts."""
        return self.freeze(datetime(year, month, day, hour, minute, tzinfo=timezone.utc))

    def advance(self, **delta: float) -> datetime:
        """Move the (stopped) clock on by ``timedelta(**delta)``: ``advance(days=31)``."""
        return self.freeze(self() + timedelta(**delta))


class UsageGuardKit:
    """A :class:`UsageGuard` on a ``memory://`` server of its own, its :class:`ManualClock`,
    and what a test needs around them. ``options`` are ``from_url``'s (plans,
    default_plan, catalog, ...). The application under test can share the server and
    clock: ``UsageGuard.from_url(kit.url, clock=kit.clock, ...)``."""

    def __init__(self, **options: Any) -> None:
        self.clock = ManualClock()
        options.setdefault("clock", self.clock)
        #: The kit's ``memory://`` server, by name: guards built on it share its data.
        self.url = f"memory://usage-guard-kit-{uuid.uuid4().hex}"
        self.guard = UsageGuard.from_url(self.url, **options)

    def reset(self, org: str) -> None:
        """Forget everything of ``org``: its usage, plan, limits, budgets, reservations."""
        command = self.guard.backend.sync().command
        base = KeySpace.of(self.guard.calls.prefix, org).base
        keys = command("KEYS", re.sub(r"([\\*?\[\]])", r"\\\1", base) + "*")
        if keys:
            command("DEL", *keys)
        self.guard.calls.learn_plan(org, "")

    def set_usage(self, org: str, metric: str, value: int, *, user: str | None = None) -> None:
        """Set a meter this month, unchecked (a test's starting point, e.g. an org at
        95 % of its cap): the org's meter, or ``user``'s personal count of a personal
        metric. A cumulative meter is set as :meth:`UsageGuard.set_usage` does."""
        calls = self.guard.calls
        meter = calls.catalog[metric]
        check_value(value, "value")
        if not meter.monthly:
            if user is not None:
                raise InvalidUsage(f"{metric} is cumulative: it has no personal counts")
            self.guard.set_usage(org, metric, value)
            return
        space = KeySpace.of(calls.prefix, org)
        period, ttl, _ = calls.time.now()
        if user is None:
            key, field = space.meters(period.key), metric
        elif meter.personal:
            key, field = space.personal(period.key), personal_field(encode_id(user), metric)
        else:
            raise InvalidUsage(f"{metric} takes no personal counts")
        command = self.guard.backend.sync().command
        command("HSET", key, field, value)
        command("EXPIRE", key, ttl)

    def close(self) -> None:
        self.guard.close()

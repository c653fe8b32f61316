"""Reading the scripts' replies into decisions, threshold events and usage: no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .catalog import Catalog, Metric
from .decision import Decision, Scope, ThresholdEvent
from .errors import CorruptedCounter
from .faults import LateReply
from .keys import counter_id, decode_id
from .periods import Period
from .plans import Plans, admitted
from .usage import MemberUsage, MeterUsage, PersonalUsage, Usage

Events = tuple[ThresholdEvent, ...]
#: A scope as an idempotency record stores it: by its initial (see lua/consume.lua).
_SCOPES: dict[str, Scope] = {"o": "organization", "p": "personal"}


class Replies:
    """Reads replies for one catalog and set of plans (an org assigned a plan that is not
    configured is logged once)."""

    def __init__(self, catalog: Catalog, plans: Plans) -> None:
        self.catalog = catalog
        self.plans = plans
        self._warned_plans: set[tuple[str, str]] = set()
        #: Per metric, whether it resets monthly (read for every reply).
        self._monthly = {metric.name: metric.monthly for metric in catalog}

    def decision(self, org: str, period: Period, reply: Any) -> tuple[Decision, Events]:
        if reply[0] == 2:
            name, scope, used, limit, quota, period_key, requested = reply[1].split("\t")
            replayed = self._make_decision(
                True,
                name,
                _SCOPES[scope],
                int(used),
                int(limit),
                int(quota),
                Period.parse(period_key),
                int(requested),
                replayed=True,
            )
            return replayed, ()
        if reply[0] == 3:  # it ran after its deadline: the caller gets the policy's answer
            raise LateReply("Redis ran the call after its caller's deadline")
        decision = self._make_decision(
            reply[0] == 1, reply[1], reply[2], reply[3], reply[4], reply[5], period, reply[6]
        )
        if len(reply) == 7:  # a personal budget's denial: no other metrics, no events
            return decision, ()
        if reply[7]:
            others = reply[7]
            decision = replace(
                decision,
                others=tuple(
                    self._make_decision(
                        True,
                        others[i],
                        others[i + 1],
                        others[i + 2],
                        others[i + 3],
                        others[i + 4],
                        period,
                        others[i + 5],
                    )
                    for i in range(0, len(others), 6)
                ),
            )
        if len(reply) == 8:  # the common case: no threshold reached
            return decision, ()
        return decision, self._events(org, period, period, reply, 8)

    def _make_decision(
        self,
        allowed: bool,
        name: str,
        scope: Scope,
        used: int,
        limit: int,
        quota: int,
        period: Period,
        requested: int,
        *,
        replayed: bool = False,
    ) -> Decision:
        unlimited = quota < 0  # the scripts send -1 for "no limit"
        # Positional arguments: this runs on every call.
        return Decision(
            allowed,
            name,
            scope,
            used,
            None if limit < 0 else limit,
            None if unlimited else (quota - used if quota > used else 0),
            period.end if self._monthly[name] else None,
            None if unlimited else quota,
            replayed,
            requested,
        )

    def adjusted(
        self, org: str, period: Period, counted: Period, reply: Any
    ) -> tuple[bool, Events]:
        return reply[0] == 1, self._events(org, period, counted, reply, 1)

    def _events(self, org: str, period: Period, counted: Period, reply: Any, start: int) -> Events:
        """The (name, threshold, used, limit) quadruples a script appended to its reply: a
        monthly meter's in the period it was counted in, a cumulative one's now."""
        if len(reply) <= start:
            return ()
        return tuple(
            ThresholdEvent(
                org,
                reply[i],
                reply[i + 1],
                reply[i + 2],
                reply[i + 3],
                (counted if self._monthly[reply[i]] else period).key,
            )
            for i in range(start, len(reply), 4)
        )

    def warn_plan(self, org: str, plan: str) -> None:
        """Log, once per org, that its assigned plan is not configured."""
        if (org, plan) not in self._warned_plans:
            self._warned_plans.add((org, plan))
            self.plans.effective(org, plan)

    def usage(
        self,
        org: str,
        user: str | None,
        period: Period,
        window: tuple[Period, ...],
        fields: list[tuple[Metric, str]],
        keys: Sequence[str],
        reply: Any,
    ) -> Usage:
        """An org's usage from read.lua's reply to ``keys`` (see Calls.usage), with
        ``fields``: each personal metric and its field. What open reservations hold
        counts too, found in 'held' under each counter's name (see lua/_reservations.lua)."""
        org_key, personal_key, month_keys = keys[0], keys[4], keys[5:]

        def count(key: str, field: str, value: str | None) -> int:
            try:
                return int(value or 0) + held.get(counter_id(key, field), 0)
            except ValueError:
                raise CorruptedCounter(key, field) from None

        held = {name: int(value) for name, value in _pairs(reply[4]).items()}
        org_hash = _pairs(reply[0])
        months = [_pairs(month) for month in reply[3]]
        plan = self.plans.effective(org, org_hash.get("plan"))
        overrides = {
            name[6:]: value for name, value in org_hash.items() if name.startswith("limit:")
        }
        meters: dict[str, MeterUsage] = {}
        for m in self.catalog:
            if m.monthly:
                history = tuple(
                    count(key, m.name, month.get(m.name))
                    for key, month in zip(month_keys, months, strict=True)
                )
            else:
                recorded = [
                    None if m.name not in month else count(key, m.name, month[m.name])
                    for key, month in zip(month_keys, months, strict=True)
                ]
                started = next(
                    (
                        _started(key, m.name, month)
                        for key, month, value in zip(month_keys, months, recorded, strict=True)
                        if value is not None
                    ),
                    None,
                )
                current = count(org_key, m.name, org_hash.get(m.name))
                history = _carried(recorded, started, current)
            limit = self.plans.resolve(plan, overrides, m.name)
            quota = None if limit is None else admitted(limit, self.catalog.percent_admitted(m))
            meters[m.name] = MeterUsage(m.name, history[-1], limit, quota, history)
        mine = {
            m.name: PersonalUsage(
                m.name, count(personal_key, field, value), None if budget is None else int(budget)
            )
            for (m, field), budget, value in zip(fields, reply[1], reply[2], strict=True)
        }
        return Usage(org, user, None if plan is None else plan.name, period, window, meters, mine)

    def members(
        self, key: str, metrics: Sequence[str], top: int, reply: Any
    ) -> dict[str, tuple[MemberUsage, ...]]:
        """members.lua's reply: per personal metric, the ``top`` members by use (held
        estimates included), then by user id; those with a budget and no use too."""
        counts, budgets, held = (_pairs(part) for part in reply)
        prefix = counter_id(key)
        found: dict[str, dict[str, list[int | None]]] = {metric: {} for metric in metrics}
        # A member whose only use is an open reservation's estimate has no count yet.
        held_here = {name.removeprefix(prefix) for name in held if name.startswith(prefix)}
        for field in counts.keys() | held_here:
            user, _, metric = field.rpartition(":")
            if metric in found:
                try:
                    used = int(counts.get(field, 0)) + int(held.get(counter_id(key, field), 0))
                except ValueError:
                    raise CorruptedCounter(key, field) from None
                found[metric].setdefault(user, [0, None])[0] = used
        for field, value in budgets.items():
            user, _, metric = field.rpartition(":")
            if metric in found:
                found[metric].setdefault(user, [0, None])[1] = int(value)
        return {
            metric: tuple(
                MemberUsage(decode_id(user), int(used or 0), budget)
                for user, (used, budget) in sorted(
                    users.items(), key=lambda item: (-(item[1][0] or 0), item[0])
                )[:top]
            )
            for metric, users in found.items()
        }


def nothing(reply: Any) -> tuple[None, Events]:
    return None, ()


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _started(key: str, metric: str, month: Mapping[str, str]) -> int:
    """The value a cumulative metric started a month with (0 unless recorded)."""
    try:
        return int(month.get(f"s:{metric}", 0))
    except ValueError:
        raise CorruptedCounter(key, f"s:{metric}") from None


def _carried(recorded: Sequence[int | None], started: int | None, current: int) -> tuple[int, ...]:
    """A cumulative meter's value in each month of the window, from the last value each
    month recorded (None: no change that month), the value the first month with one
    started from (None: no month has one) and its value now (the last month's).

    A month without a value of its own has the one before it; months before the first
    one have the value it started from (see remember() in lua/_lib.lua). With none
    recorded, the value has not changed during the window.
    """
    last = current if started is None else started
    values = []
    for value in recorded[:-1]:
        last = last if value is None else value
        values.append(last)
    return (*values, current)

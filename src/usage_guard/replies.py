"""Reading the scripts' replies into decisions, threshold events and usage: no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .catalog import Catalog, Metric
from .decision import Decision, Scope, ThresholdEvent
from .errors import CorruptedCounter
from .faults import LateReply
from .periods import Period
from .plans import Plans, admitted
from .usage import MeterUsage, PersonalUsage, Usage

Events = tuple[ThresholdEvent, ...]


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
                scope,
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
        if reply[6]:
            self._warn_plan(org, reply[6])
        decision = self._make_decision(
            reply[0] == 1, reply[1], reply[2], reply[3], reply[4], reply[5], period, reply[7]
        )
        if len(reply) == 8:  # a personal budget's denial: no other metrics, no events
            return decision, ()
        if reply[8]:
            others = reply[8]
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
        if len(reply) == 9:  # the common case: no threshold reached
            return decision, ()
        return decision, self._events(org, period, period, reply, 9)

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

    def _warn_plan(self, org: str, plan: str) -> None:
        if (org, plan) not in self._warned_plans:
            self._warned_plans.add((org, plan))
            self.plans.effective(org, plan)

    def usage(
        self,
        org: str,
        user: str | None,
        period: Period,
        window: tuple[Period, ...],
        personal: list[Metric],
        counters: list[str],
        reply: Any,
    ) -> Usage:
        org_hash = _pairs(reply[0])
        counts = _counts(counters, reply[2])
        for i, held in enumerate(reply[4]):  # estimates of open reservations count too
            counts[i] += int(held or 0)
        budgets, values, histories = reply[1], iter(counts), iter(reply[3])
        plan = self.plans.effective(org, org_hash.get("plan"))
        overrides = {
            name[6:]: value for name, value in org_hash.items() if name.startswith("limit:")
        }
        meters: dict[str, MeterUsage] = {}
        for m in self.catalog:
            if m.monthly:
                history = tuple(next(values) for _ in window)
            else:
                current = next(values)
                history = _carried_forward(_pairs(next(histories)), window, current)
            limit = self.plans.resolve(plan, overrides, m.name)
            quota = None if limit is None else admitted(limit, self.catalog.percent_admitted(m))
            meters[m.name] = MeterUsage(m.name, history[-1], limit, quota, history)
        mine = {
            m.name: PersonalUsage(m.name, next(values), None if budget is None else int(budget))
            for m, budget in zip(personal, budgets, strict=True)
        }
        return Usage(org, user, None if plan is None else plan.name, period, window, meters, mine)


def nothing(reply: Any) -> tuple[None, Events]:
    return None, ()


def _counts(keys: Sequence[str], values: Sequence[str | None]) -> list[int]:
    """The counters read, as ints (absent: 0); one that holds no integer is named."""
    counts = []
    for key, value in zip(keys, values, strict=True):
        try:
            counts.append(int(value or 0))
        except ValueError:
            raise CorruptedCounter(key) from None
    return counts


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _carried_forward(
    recorded: Mapping[str, str], window: tuple[Period, ...], current: int
) -> tuple[int, ...]:
    """Each period's last value: the newest one recorded at or before it, 0 before any."""
    known = sorted((Period.parse(k), int(v)) for k, v in recorded.items())
    values = []
    for period in window[:-1]:
        earlier = [value for at, value in known if at <= period]
        values.append(earlier[-1] if earlier else 0)
    return (*values, current)

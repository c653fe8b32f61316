"""Call building, without I/O: validates a request and builds its one script call.

The sync and async guards send a :class:`Call` and hand its reply to ``call.parse``
(see :mod:`usage_guard.replies`); when Redis fails, :mod:`usage_guard.runtime` answers
by the call's ``fallback``. Every rule that is not Lua lives here and there.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Literal, TypeVar

from .catalog import DEFAULT_CATALOG, Catalog, Metric
from .clock import GuardClock
from .decision import Decision
from .errors import InvalidUsage
from .keys import KeySpace, budget_field, encode_id
from .periods import Clock, Period, utc_now
from .plans import UNLIMITED, Plan, Plans, admitted, check_limit, check_value
from .replies import Events, Replies, nothing
from .reservations import Ticket, check_reservation_ttl
from .usage import Usage

T = TypeVar("T")
Amounts = Mapping[str, int]
#: The outage policy's answer to a consumption: see :meth:`Runtime.unavailable`.
Unavailable = Callable[[Sequence[tuple[Metric, int]], Period], Decision]


@dataclass(slots=True)
class Call(Generic[T]):
    """One script call: what to send, how to read the reply, what to do if Redis fails.

    ``parse`` turns the reply into the result and the threshold events it reports.
    """

    script: str
    keys: list[str]
    args: list[str | int]
    parse: Callable[[Any], tuple[T, Events]]
    fallback: Callable[[], T] | None = None
    #: Whether it waits within the request's budget; settling or refunding finished
    #: work does not: it has its own ``timeout``.
    bounded: bool = True
    #: Where in ``args`` the client writes the moment it gives up on the call, by Redis's
    #: clock (see :mod:`usage_guard.servertime`); None: the call carries no deadline.
    deadline_arg: int | None = None


#: Single-metric consumptions prepared at once, per (org, metric, user); past it the
#: cache starts afresh (a prepared call is rebuilt in microseconds).
PREPARED_SIZE = 4096
# Where a consume call's arguments hold the keys' TTL, the time, the moment its caller
# gives up, what the caller is then told and the amount (see lua/_lib.lua).
_TTL_ARG, _NOW_ARG, DEADLINE_ARG, _LATE_ARG, _AMOUNT_ARG = 1, 5, 7, 8, 10
#: What a consumption that runs after its caller gave up does (see lua/consume.lua).
_LATE = {True: "count", False: "skip"}


def _counted(reply: Any) -> tuple[bool, Events]:
    return True, ()


@dataclass(slots=True)
class _Prepared:
    """A single-metric consumption built for one period: the call that each one copies."""

    period: Period
    call: Call[Decision]


class Calls:
    """A guard's configuration and the calls it builds from it. Shared by a guard and its
    twin; its only state is caches (the current period, prepared consumptions)."""

    def __init__(
        self,
        *,
        unavailable: Unavailable,
        plans: Mapping[str, Plan] | None = None,
        default_plan: str | None = None,
        catalog: Catalog = DEFAULT_CATALOG,
        clock: Clock | None = None,
        prefix: str = "ug",
        history_months: int = 6,
        reservation_ttl: float = 900,
    ) -> None:
        if not isinstance(catalog, Catalog):
            raise InvalidUsage("catalog must be a Catalog")
        if not prefix or any(c in prefix for c in "{}: "):
            raise InvalidUsage("prefix must be non-empty, without braces, colons or spaces")
        if type(history_months) is not int or not 1 <= history_months <= 120:
            raise InvalidUsage("history_months must be an int from 1 to 120")
        self.catalog = catalog
        self.plans = Plans(plans, default_plan, catalog)
        self.time = GuardClock(clock or utc_now, history_months)
        self.prefix = prefix
        self.history_months = history_months
        self.reservation_ttl = check_reservation_ttl(reservation_ttl, "reservation_ttl")
        self.replies = Replies(catalog, self.plans)
        self.unavailable = unavailable
        self._prepared: dict[tuple[str, str, str | None], _Prepared] = {}
        self._default_plan = default_plan or ""
        # Per metric, the spec the scripts read its cap, reset and every plan's limit from.
        self._specs = {m.name: self._spec(m, history_months) for m in catalog}

    @property
    def clock(self) -> Clock:
        """The guard's clock (``clock=`` of ``from_url``; the real one by default)."""
        return self.time.clock

    def _spec(self, metric: Metric, history_months: int) -> str:
        """What the scripts need to know of a metric: see the header of ``lua/_lib.lua``."""
        percent = self.catalog.percent_admitted(metric)
        spec = f"{1 if metric.monthly else 0}:{percent}:{history_months}\n"
        for plan in self.plans.by_name.values():
            limit = plan.limit(metric.name)
            if limit is None:
                spec += f"{plan.name}=-\n"
            else:
                first_threshold = -(-limit * 80 // 100)  # 80 %, rounded up as the scripts do
                spec += f"{plan.name}={limit}:{admitted(limit, percent)}:{first_threshold}\n"
        return spec

    # -- requests -----------------------------------------------------------------------

    def amounts(self, metric: str | Amounts, amount: int) -> list[tuple[Metric, int]]:
        if isinstance(metric, str):
            return [(self.catalog[metric], check_value(amount))]
        if not isinstance(metric, Mapping) or not metric:
            raise InvalidUsage("metric must be a metric name or a non-empty mapping of amounts")
        if amount != 1:  # 1 is the default: what else was passed would be ignored
            raise InvalidUsage("a mapping of metrics carries its amounts: pass no amount with it")
        return [(self.catalog[name], check_value(value)) for name, value in metric.items()]

    def _script_args(
        self,
        space: KeySpace,
        user: str | None,
        items: Sequence[tuple[Metric, int]],
        now: tuple[Period, int, int],
        mode: str,
        *,
        extra_keys: Sequence[str] = (),
        mode_number: int = 0,
        counted: Period | None = None,
    ) -> tuple[list[str], list[str | int]]:
        """Keys and arguments of consume.lua or adjust.lua (see lua/_lib.lua): the change
        happens ``now``; monthly counters are those of ``counted`` (default: now's)."""
        period, ttl, now_ms = now
        user_id = "" if user is None else encode_id(user)
        pkey = period.key
        ckey = pkey if counted is None else counted.key
        keys = [space.org, space.budgets, space.thresholds(pkey), space.reservations, space.held]
        args: list[str | int] = [
            *(pkey, ttl, self._default_plan, mode, user_id, now_ms, mode_number),
            *(0, ""),  # no deadline (consumptions get theirs in _consume_call)
        ]
        for metric, amount in items:
            personal = metric.personal and user is not None
            if metric.monthly:
                counter = space.counter(metric.name, ckey)
                other = space.personal(user_id, metric.name, ckey) if personal else counter
                keys += (counter, other)
            else:
                keys += (space.gauge(metric.name), space.history(metric.name))
            args += (metric.name, amount, 1 if personal else 0, self._specs[metric.name])
        keys += extra_keys
        return keys, args

    def consume(
        self,
        org: str,
        metric: str | Amounts,
        amount: int,
        *,
        user: str | None,
        idempotency_key: str | None = None,
        check: bool = False,
    ) -> Call[Decision]:
        if (
            type(metric) is str
            and type(org) is str
            and (user is None or type(user) is str)
            and idempotency_key is None
            and not check
        ):
            return self._consume_one(org, metric, amount, user)
        items = self.amounts(metric, amount)
        now = self.time.now()
        space = KeySpace.of(self.prefix, org)
        mode, extra = ("check" if check else "consume"), []
        if idempotency_key is not None and not check:
            mode, extra = "idempotent", [space.idempotency(idempotency_key)]
        keys, args = self._script_args(space, user, items, now, mode, extra_keys=extra)
        return self._consume_call(org, now[0], items, keys, args)

    def _consume_call(
        self,
        org: str,
        period: Period,
        items: Sequence[tuple[Metric, int]],
        keys: list[str],
        args: list[str | int],
    ) -> Call[Decision]:
        """A run of consume.lua, read into a Decision (the outage policy's when Redis fails,
        and when the call runs after its caller gave up on it: then it is counted, unchecked,
        if the policy served the caller; a check or a reservation is never counted)."""
        fallback = partial(self.unavailable, items, period)
        counts = args[3] in ("consume", "idempotent") and fallback().allowed
        args[_LATE_ARG] = _LATE[counts]
        return Call(
            "consume",
            keys,
            args,
            partial(self.replies.decision, org, period),
            fallback,
            deadline_arg=DEADLINE_ARG,
        )

    def _consume_one(self, org: str, metric: str, amount: int, user: str | None) -> Call[Decision]:
        """The common consumption, one metric by name: its keys, spec and reply readers are
        built once per (org, metric, user) and month; a call sets only TTL and amount."""
        prepared = self._prepared.get((org, metric, user))
        if prepared is None:
            self.catalog.require(metric)  # an unknown metric is named before a bad amount
        check_value(amount)
        period, ttl, now_ms = self.time.now()
        if prepared is None or prepared.period is not period:
            prepared = self._prepare(org, metric, user, period)
        template = prepared.call
        args = template.args.copy()
        args[_TTL_ARG] = ttl
        args[_NOW_ARG] = now_ms
        args[_AMOUNT_ARG] = amount
        return Call(
            "consume", template.keys, args, template.parse, template.fallback, True, DEADLINE_ARG
        )

    def _prepare(self, org: str, metric: str, user: str | None, period: Period) -> _Prepared:
        items = [(self.catalog[metric], 0)]
        keys, args = self._script_args(
            KeySpace.of(self.prefix, org), user, items, (period, 0, 0), "consume"
        )
        prepared = _Prepared(period, self._consume_call(org, period, items, keys, args))
        if len(self._prepared) >= PREPARED_SIZE:
            self._prepared.clear()
        self._prepared[org, metric, user] = prepared
        return prepared

    def reserve(
        self,
        org: str,
        metric: str | Amounts,
        amount: int,
        *,
        user: str | None,
        ttl: float | None = None,
    ) -> tuple[Call[Decision], Ticket]:
        items = self.amounts(metric, amount)
        hold = self.reservation_ttl if ttl is None else check_reservation_ttl(ttl, "ttl")
        now = self.time.now()
        space = KeySpace.of(self.prefix, org)
        ticket = Ticket(
            uuid.uuid4().hex,
            org,
            user,
            now[0],
            {m.name: a for m, a in items},
            now[2] + math.ceil(hold * 1000),
        )
        keys, args = self._script_args(
            space,
            user,
            items,
            now,
            "reserve",
            extra_keys=(space.reservation(ticket.id),),
            mode_number=ticket.deadline,
        )
        return self._consume_call(org, now[0], items, keys, args), ticket

    def settle(self, ticket: Ticket, actual: int | Amounts | None) -> Call[bool]:
        """``actual=None`` cancels: the estimate is refunded."""
        if actual is None:
            amounts, mode = dict(ticket.amounts), "cancel"
        elif isinstance(actual, Mapping):
            if set(actual) != set(ticket.amounts):
                raise InvalidUsage(f"settle needs an amount for each of {sorted(ticket.amounts)}")
            amounts, mode = dict(actual), "settle"
        elif len(ticket.amounts) == 1:
            amounts, mode = dict.fromkeys(ticket.amounts, actual), "settle"
        else:
            raise InvalidUsage("a reservation of several metrics settles with a mapping")
        items = [
            (self.catalog[name], check_value(value, "actual")) for name, value in amounts.items()
        ]
        now = self.time.now()
        counted = ticket.period
        space = KeySpace.of(self.prefix, ticket.org)
        keys, args = self._script_args(
            space,
            ticket.user,
            items,
            now,
            mode,
            extra_keys=(space.reservation(ticket.id), space.thresholds(counted.key)),
            mode_number=self.time.ttl(counted),
            counted=counted,
        )
        return Call(
            "adjust",
            keys,
            args,
            lambda reply: self.replies.adjusted(ticket.org, now[0], counted, reply),
            bounded=False,
        )

    def adjust(
        self, org: str, metric: str | Amounts, amount: int, mode: Literal["release", "set"]
    ) -> Call[bool]:
        items = self.amounts(metric, amount)
        for m, _ in items:
            if m.monthly:
                raise InvalidUsage(
                    f"{m.name} resets monthly: only cumulative metrics can be released or set"
                )
        now = self.time.now()
        keys, args = self._script_args(KeySpace.of(self.prefix, org), None, items, now, mode)
        return Call(
            "adjust", keys, args, lambda reply: self.replies.adjusted(org, now[0], now[0], reply)
        )

    def provisional(
        self, org: str, metric: str | Amounts, amount: int, *, user: str | None
    ) -> Call[Decision]:
        """A consumption whose request may still be refused (an integration's): run late,
        it counts nothing, whatever the policy; the integration counts it with
        :meth:`owed` once the request has been served."""
        call = self.consume(org, metric, amount, user=user)
        call.args[_LATE_ARG] = _LATE[False]
        return call

    def owed(self, org: str, amounts: Amounts, user: str | None) -> Call[bool]:
        """Count, unchecked and once, what a request the outage policy served consumed:
        a consumption late on purpose (its deadline 1 ms after the epoch) under an
        idempotency key of its own, so a retry after a timeout counts nothing more."""
        items = self.amounts(amounts, 1)
        space = KeySpace.of(self.prefix, org)
        record = space.idempotency(f"owed:{uuid.uuid4().hex}")
        keys, args = self._script_args(
            space, user, items, self.time.now(), "idempotent", extra_keys=(record,)
        )
        args[DEADLINE_ARG], args[_LATE_ARG] = 1, _LATE[True]
        # The reply is {3} (counted late) or {2, ...} (counted by an earlier try).
        return Call("consume", keys, args, _counted, bounded=False)

    def refund(
        self, org: str, amounts: Amounts, user: str | None, admitted: Decision
    ) -> Call[bool]:
        """Take back what ``admitted`` counted for a request that was refused after all,
        unchecked and never below 0, in the period it was counted in."""
        items = self.amounts(amounts, 1)
        now = self.time.now()
        counted = (
            now[0]
            if admitted.resets_at is None
            else Period.containing(admitted.resets_at).shift(-1)
        )
        space = KeySpace.of(self.prefix, org)
        keys, args = self._script_args(space, user, items, now, "release", counted=counted)
        return Call(
            "adjust",
            keys,
            args,
            lambda reply: self.replies.adjusted(org, now[0], counted, reply),
            bounded=False,
        )

    # -- admin --------------------------------------------------------------------------

    def _admin(self, space: KeySpace, key: str, *args: str) -> Call[None]:
        keys = [space.org, key, space.reservations, space.held]
        return Call("admin", keys, [self.time.now()[2], *args], nothing)

    def assign_plan(self, org: str, plan: str | None) -> Call[None]:
        if plan is not None:
            self.plans.get(plan)
        space = KeySpace.of(self.prefix, org)
        return self._admin(space, space.org, "assign", plan or "")

    def set_limit(self, org: str, metric: str, limit: int | None) -> Call[None]:
        self.catalog.require(metric)
        stored = UNLIMITED if check_limit(limit) is None else str(limit)
        space = KeySpace.of(self.prefix, org)
        return self._admin(space, space.org, "set", f"limit:{metric}", stored)

    def remove_limit(self, org: str, metric: str) -> Call[None]:
        self.catalog.require(metric)
        space = KeySpace.of(self.prefix, org)
        return self._admin(space, space.org, "unset", f"limit:{metric}")

    def set_budget(self, org: str, user: str, metric: str, budget: int | None) -> Call[None]:
        if not self.catalog[metric].personal:
            raise InvalidUsage(f"{metric} takes no personal budgets")
        space = KeySpace.of(self.prefix, org)
        name = budget_field(encode_id(user), metric)
        if check_limit(budget, "budget") is None:
            return self._admin(space, space.budgets, "unset", name)
        return self._admin(space, space.budgets, "set", name, str(budget))

    # -- reads --------------------------------------------------------------------------

    def usage(self, org: str, user: str | None = None) -> Call[Usage]:
        space = KeySpace.of(self.prefix, org)
        user_id = None if user is None else encode_id(user)
        period, _, now_ms = self.time.now()
        window = period.window(self.history_months)
        strings: list[str] = []
        histories: list[str] = []
        for m in self.catalog:
            if m.monthly:
                strings += (space.counter(m.name, p.key) for p in window)
            else:
                strings.append(space.gauge(m.name))
                histories.append(space.history(m.name))
        personal = list(self.catalog.personal()) if user_id is not None else []
        strings += (space.personal(user_id or "", m.name, period.key) for m in personal)
        budgets = [budget_field(user_id or "", m.name) for m in personal]
        keys = [space.org, space.budgets, space.reservations, space.held, *strings, *histories]
        return Call(
            "read",
            keys,
            [now_ms, len(strings), *budgets],
            lambda reply: (
                self.replies.usage(org, user, period, window, personal, strings, reply),
                (),
            ),
        )

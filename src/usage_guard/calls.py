"""Call building, without I/O: validates a request and builds its one script call.

The sync and async guards send a :class:`Call` and hand its reply to ``call.parse``
(see :mod:`usage_guard.replies`); when Redis fails, :mod:`usage_guard.runtime` answers
by the call's ``fallback``. Every rule that is not Lua lives here and there.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, Literal, TypeVar

from .catalog import DEFAULT_CATALOG, Catalog, Metric
from .clock import GuardClock
from .decision import Decision
from .errors import InvalidUsage
from .faults import PlanChanging
from .keys import KeySpace, encode_id, personal_field
from .periods import Clock, Period, utc_now
from .plans import UNLIMITED, Plan, Plans, admitted, check_limit, check_value
from .replies import Events, Replies, nothing
from .reservations import Ticket, check_reservation_ttl
from .usage import MemberUsage, Usage

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
    #: The org whose plan the call's limits are those of (consume.lua and adjust.lua):
    #: a reply of :data:`STALE_PLAN` asks for :meth:`Calls.replanned`.
    planned_for: str | None = None


#: Single-metric consumptions prepared at once, per (org, metric, user); past it the
#: cache starts afresh (a prepared call is rebuilt in microseconds).
PREPARED_SIZE = 4096
#: Orgs whose assigned plan a guard remembers (an org with none needs no entry); past it
#: the oldest is forgotten, and its next call learns it again (one more round trip).
KNOWN_PLANS = 65536
#: What consume.lua and adjust.lua reply when the org's stored plan is not the one the
#: call was built for: ``[STALE_PLAN, stored plan]`` (see lua/_lib.lua).
STALE_PLAN = 4
#: Tries of a call whose org's plan was not the one it was built for: another process
#: assigned it, or this one has not learnt it yet (the second try is the common one).
PLAN_TRIES = 3
# Where the arguments of consume.lua and adjust.lua hold the keys' TTL, the plan, the
# time, the moment its caller gives up, what the caller is then told, and the first
# metric's name and amount (see lua/_lib.lua).
_TTL_ARG, _PLAN_ARG, _NOW_ARG, DEADLINE_ARG, _LATE_ARG = 1, 2, 5, 7, 8
_FIRST_METRIC_ARG, _AMOUNT_ARG = 9, 10
#: What a consumption that runs after its caller gave up does (see lua/consume.lua).
_LATE = {True: "count", False: "skip"}


def _counted(reply: Any) -> tuple[bool, Events]:
    return True, ()


@dataclass(slots=True)
class _Prepared:
    """A single-metric consumption built for one period and plan: the call that each one
    copies."""

    period: Period
    plan: str
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
        # The plan each org is assigned, as stored: only orgs that have one.
        self._assigned: dict[str, str] = {}
        self._learning = threading.Lock()
        # Per assigned plan ('' for none), per metric, the spec the scripts read the
        # metric's cap, reset and limit from.
        self._specs: dict[str, dict[str, str]] = {}
        #: Calls sent again because the org's plan was not the one they were built for.
        self.plan_refreshes = 0

    @property
    def clock(self) -> Clock:
        """The guard's clock (``clock=`` of ``from_url``; the real one by default)."""
        return self.time.clock

    def _specs_of(self, assigned: str) -> dict[str, str]:
        """Per metric, what the scripts need to know of it for an org assigned the plan
        ``assigned`` ('' for none): see the header of ``lua/_lib.lua``."""
        specs = self._specs.get(assigned)
        if specs is None:
            plan = self.plans.by_name.get(assigned) or self.plans.by_name.get(
                self.plans.default or ""
            )
            specs = {m.name: self._spec(m, plan) for m in self.catalog}
            if len(self._specs) >= KNOWN_PLANS:  # names of plans that are not configured
                self._specs.clear()
            self._specs[assigned] = specs
        return specs

    def _spec(self, metric: Metric, plan: Plan | None) -> str:
        percent = self.catalog.percent_admitted(metric)
        limit = None if plan is None else plan.limit(metric.name)
        if limit is None:
            return f"{1 if metric.monthly else 0}:{percent}:-"
        first_threshold = -(-limit * 80 // 100)  # 80 %, rounded up as the scripts do
        quota = admitted(limit, percent)
        return f"{1 if metric.monthly else 0}:{percent}:{limit}:{quota}:{first_threshold}"

    def learn_plan(self, org: str, stored: str) -> None:
        """Remember the plan ``org`` is assigned as stored ('' for none)."""
        with self._learning:
            if not stored:
                self._assigned.pop(org, None)
                return
            if org not in self._assigned and len(self._assigned) >= KNOWN_PLANS:
                del self._assigned[next(iter(self._assigned))]
            self._assigned[org] = stored
        if stored not in self.plans.by_name:
            self.replies.warn_plan(org, stored)

    def replanned(self, call: Call[T], stored: str, tries_left: int) -> Call[T]:
        """``call`` built again for the plan its org turned out to be assigned; raises
        :class:`PlanChanging` when no try is left."""
        org = call.planned_for
        assert org is not None
        self.learn_plan(org, stored)
        if not tries_left:
            raise PlanChanging(f"the plan of org {org!r} changed during each of its tries")
        with self._learning:
            self.plan_refreshes += 1
        args = call.args.copy()
        args[_PLAN_ARG] = stored
        specs = self._specs_of(stored)
        for at in range(_FIRST_METRIC_ARG, len(args), 4):
            args[at + 3] = specs[str(args[at])]
        return replace(call, args=args)

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
        org: str,
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
        happens ``now``; monthly counts are those of ``counted`` (default: now's)."""
        space = KeySpace.of(self.prefix, org)
        period, ttl, now_ms = now
        user_id = "" if user is None else encode_id(user)
        current, last = period.key, period.shift(-1).key
        counted_key = current if counted is None else counted.key
        keys = [
            *(space.org, space.budgets, space.reservations, space.held),
            *(space.meters(current), space.meters(last), space.meters(counted_key)),
            *(space.personal(current), space.personal(last), *extra_keys),
        ]
        assigned = self._assigned.get(org, "")
        specs = self._specs_of(assigned)
        args: list[str | int] = [
            *(current, ttl, assigned, mode, user_id, now_ms, mode_number),
            *(0, ""),  # no deadline (consumptions get theirs in _consume_call)
        ]
        for metric, amount in items:
            personal = metric.personal and user is not None
            args += (metric.name, amount, 1 if personal else 0, specs[metric.name])
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
        mode, extra = ("check" if check else "consume"), []
        if idempotency_key is not None and not check:
            mode = "idempotent"
            extra = [KeySpace.of(self.prefix, org).idempotency(idempotency_key)]
        keys, args = self._script_args(org, user, items, now, mode, extra_keys=extra)
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
            planned_for=org,
        )

    def _consume_one(self, org: str, metric: str, amount: int, user: str | None) -> Call[Decision]:
        """The common consumption, one metric by name: its keys, spec and reply readers are
        built once per (org, metric, user), month and plan; a call sets only the TTL, the
        time and the amount."""
        prepared = self._prepared.get((org, metric, user))
        if prepared is None:
            self.catalog.require(metric)  # an unknown metric is named before a bad amount
        check_value(amount)
        period, ttl, now_ms = self.time.now()
        if (
            prepared is None
            or prepared.period is not period
            or prepared.plan != self._assigned.get(org, "")
        ):
            prepared = self._prepare(org, metric, user, period)
        template = prepared.call
        args = template.args.copy()
        args[_TTL_ARG] = ttl
        args[_NOW_ARG] = now_ms
        args[_AMOUNT_ARG] = amount
        return Call(
            "consume",
            template.keys,
            args,
            template.parse,
            template.fallback,
            True,
            DEADLINE_ARG,
            org,
        )

    def _prepare(self, org: str, metric: str, user: str | None, period: Period) -> _Prepared:
        items = [(self.catalog[metric], 0)]
        keys, args = self._script_args(org, user, items, (period, 0, 0), "consume")
        plan = str(args[_PLAN_ARG])
        prepared = _Prepared(period, plan, self._consume_call(org, period, items, keys, args))
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
        ticket = Ticket(
            uuid.uuid4().hex,
            org,
            user,
            now[0],
            {m.name: a for m, a in items},
            now[2] + math.ceil(hold * 1000),
        )
        keys, args = self._script_args(
            org,
            user,
            items,
            now,
            "reserve",
            extra_keys=(KeySpace.of(self.prefix, org).reservation(ticket.id),),
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
        keys, args = self._script_args(
            ticket.org,
            ticket.user,
            items,
            now,
            mode,
            extra_keys=(KeySpace.of(self.prefix, ticket.org).reservation(ticket.id),),
            mode_number=self.time.ttl(counted),
            counted=counted,
        )
        return Call(
            "adjust",
            keys,
            args,
            lambda reply: self.replies.adjusted(ticket.org, now[0], counted, reply),
            bounded=False,
            planned_for=ticket.org,
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
        keys, args = self._script_args(org, None, items, now, mode)
        return Call(
            "adjust",
            keys,
            args,
            lambda reply: self.replies.adjusted(org, now[0], now[0], reply),
            planned_for=org,
        )

    def provisional(self, org: str, amounts: Amounts, *, user: str | None) -> Call[Decision]:
        """A consumption whose request may still be refused (an integration's): run late,
        it counts nothing, whatever the policy; the integration counts it with
        :meth:`owed` once the request has been served."""
        if len(amounts) == 1:  # one metric by name: the call prepared once per month
            [(metric, amount)] = amounts.items()
            call = self.consume(org, metric, amount, user=user)
        else:
            call = self.consume(org, amounts, 1, user=user)
        call.args[_LATE_ARG] = _LATE[False]
        return call

    def owed(self, org: str, amounts: Amounts, user: str | None) -> Call[bool]:
        """Count, unchecked and once, what a request the outage policy served consumed:
        a consumption late on purpose (its deadline 1 ms after the epoch) under an
        idempotency key of its own, so a retry after a timeout counts nothing more."""
        items = self.amounts(amounts, 1)
        record = KeySpace.of(self.prefix, org).idempotency(f"owed:{uuid.uuid4().hex}")
        keys, args = self._script_args(
            org, user, items, self.time.now(), "idempotent", extra_keys=(record,)
        )
        args[DEADLINE_ARG], args[_LATE_ARG] = 1, _LATE[True]
        # The reply is {3} (counted late) or {2, ...} (counted by an earlier try).
        return Call("consume", keys, args, _counted, bounded=False, planned_for=org)

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
        keys, args = self._script_args(org, user, items, now, "release", counted=counted)
        return Call(
            "adjust",
            keys,
            args,
            lambda reply: self.replies.adjusted(org, now[0], counted, reply),
            bounded=False,
            planned_for=org,
        )

    # -- admin --------------------------------------------------------------------------

    def _admin(self, space: KeySpace, key: str, *args: str) -> Call[None]:
        keys = [space.org, key, space.reservations, space.held]
        return Call("admin", keys, [self.time.now()[2], *args], nothing)

    def assign_plan(self, org: str, plan: str | None) -> Call[None]:
        if plan is not None:
            self.plans.get(plan)
        space = KeySpace.of(self.prefix, org)
        call = self._admin(space, space.org, "assign", plan or "")
        call.parse = partial(self._assigned_plan, org, plan or "")
        return call

    def _assigned_plan(self, org: str, plan: str, reply: Any) -> tuple[None, Events]:
        self.learn_plan(org, plan)
        return None, ()

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
        name = personal_field(encode_id(user), metric)
        if check_limit(budget, "budget") is None:
            return self._admin(space, space.budgets, "unset", name)
        return self._admin(space, space.budgets, "set", name, str(budget))

    # -- reads --------------------------------------------------------------------------

    def usage(self, org: str, user: str | None = None) -> Call[Usage]:
        space = KeySpace.of(self.prefix, org)
        period, _, now_ms = self.time.now()
        window = period.window(self.history_months)
        fields = []
        if user is not None:
            user_id = encode_id(user)
            fields = [(m, personal_field(user_id, m.name)) for m in self.catalog.personal()]
        keys = [
            *(space.org, space.budgets, space.reservations, space.held),
            space.personal(period.key),
            *(space.meters(p.key) for p in window),
        ]
        return Call(
            "read",
            keys,
            [now_ms, *(field for _, field in fields)],
            lambda reply: (
                self.replies.usage(org, user, period, window, fields, keys, reply),
                (),
            ),
        )

    def members(self, org: str, top: int) -> Call[dict[str, tuple[MemberUsage, ...]]]:
        """Per personal metric, the ``top`` members by use this period (budgets too)."""
        space = KeySpace.of(self.prefix, org)
        period, _, now_ms = self.time.now()
        own = space.personal(period.key)
        keys = [space.org, space.budgets, space.reservations, space.held, own]
        personal = [m.name for m in self.catalog.personal()]
        return Call(
            "members",
            keys,
            [now_ms],
            lambda reply: (self.replies.members(own, personal, top, reply), ()),
        )

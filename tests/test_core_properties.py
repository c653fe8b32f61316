"""Property-based tests: random operations against a pure-Python model of the rules, and
random ids through the key encoding."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage_guard import InvalidUsage, ThresholdEvent, UsageGuard
from usage_guard.keys import KeySpace, decode_id, encode_id

MakeGuard = Callable[..., UsageGuard]
MAX = 2**53 - 1
# One metric of each kind: monthly hard, monthly soft, cumulative hard, cumulative soft.
METRICS = {"emails": (True, 100), "lead_captures": (True, 110), "storage": (False, 100)}
METRICS["contacts"] = (False, 110)

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=os.environ.get("CI", "").lower() == "true",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

values = st.one_of(st.integers(0, 25), st.integers(0, MAX), st.just(MAX))
limits = st.one_of(st.none(), st.integers(0, 25), st.integers(0, MAX), st.just(MAX))
operations = st.lists(
    st.tuples(st.sampled_from(["consume", "check", "release", "set_usage"]), values),
    min_size=1,
    max_size=15,
)


@dataclass
class Meter:
    """The rules of DESIGN.md section 2 for one org meter, in plain integers."""

    monthly: bool
    percent: int
    limit: int | None
    used: int = 0
    #: The highest value the counter reached.
    peak: int = 0
    fired: int = 0
    events: list[int] = field(default_factory=list)

    @property
    def quota(self) -> int:
        return MAX if self.limit is None else min(MAX, self.limit * self.percent // 100)

    def admits(self, amount: int) -> bool:
        return self.limit is None or self.used + amount <= self.quota

    def grew(self) -> None:
        if not self.limit:
            return
        for threshold in (80, 90, 100):
            if threshold > self.fired and self.used * 100 >= self.limit * threshold:
                self.fired = threshold
                self.events.append(threshold)


@PROPERTY_SETTINGS
@given(metric=st.sampled_from(sorted(METRICS)), limit=limits, steps=operations)
def test_random_operations_follow_the_model(
    make_guard: MakeGuard, metric: str, limit: int | None, steps: list[tuple[str, int]]
) -> None:
    guard = make_guard()  # one per example: its own key prefix and listeners
    org = "acme"
    received: list[ThresholdEvent] = []
    guard.on_threshold(received.append)
    guard.set_limit(org, metric, limit)
    monthly, percent = METRICS[metric]
    model = Meter(monthly, percent, limit)
    for operation, value in steps:
        if operation in ("release", "set_usage") and monthly:
            with pytest.raises(InvalidUsage):
                getattr(guard, operation)(org, metric, value)
        elif operation == "release":
            guard.release(org, metric, value)
            model.used = max(0, model.used - value)
        elif operation == "set_usage":
            guard.set_usage(org, metric, value)
            grew, model.used = value > model.used, value
            if grew:
                model.grew()
        else:
            decision = getattr(guard, operation)(org, metric, value)
            allowed = model.admits(value)
            # check() reports what consume() would: usage with the amount when admitted.
            reported = model.used + value if allowed else model.used
            if allowed and operation == "consume" and value > 0:
                model.used += value
                model.peak = max(model.peak, model.used)
                model.grew()
            assert (decision.allowed, decision.limit) == (allowed, limit)
            if max(model.peak, reported) <= MAX:  # past it (unlimited only) doubles round
                assert decision.used == reported
            expected_quota = None if limit is None else model.quota
            assert decision.quota == expected_quota
            assert decision.remaining == (
                None if expected_quota is None else max(0, expected_quota - reported)
            )
    # Only an unlimited meter gets past MAX, where the scripts' doubles round.
    if model.peak <= MAX:
        assert guard.usage(org).meters[metric].used == model.used
    assert guard.runtime.events.drain(5) == 0  # listeners run on a background thread
    assert [e.threshold for e in received] == model.events


identifiers = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=256)


@settings(max_examples=300, deadline=None)
@given(identifier=identifiers, other=identifiers)
def test_ids_round_trip_and_stay_inside_the_hash_tag(identifier: str, other: str) -> None:
    encoded = encode_id(identifier)
    assert decode_id(encoded) == identifier
    assert not set(encoded) & set("{}: ")
    key = KeySpace("ug", identifier).meters("2026-11")
    assert key.count("{") == key.count("}") == 1
    assert decode_id(key[key.index("{") + 1 : key.index("}")]) == identifier
    assert (encode_id(other) == encoded) == (other == identifier)

"""Plans from a JSON file: what applications and the usage-guard command share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from usage_guard import InvalidUsage, Plan, UsageGuard, load_plans


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "plans.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_plan_is_its_limits_or_limits_and_rate_limits(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "default": "free",
            "plans": {
                "free": {"ai_tokens": 50_000, "emails": 500},
                "pro": {
                    "limits": {"ai_tokens": 1_000_000, "api_calls": None},
                    "rate_limits": {"api_calls": "20/second"},
                },
            },
        },
    )
    plans, default = load_plans(path)
    assert default == "free"
    assert plans == {
        "free": Plan("free", {"ai_tokens": 50_000, "emails": 500}),
        "pro": Plan("pro", {"ai_tokens": 1_000_000, "api_calls": None}, {"api_calls": "20/second"}),
    }
    guard = UsageGuard.from_url("memory://", plans=plans, default_plan=default)
    assert guard.consume("acme", "emails", 500).allowed
    assert not guard.consume("acme", "emails").allowed


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        {"plans": []},
        {"plans": {"free": 5}},
        {"plans": {"free": {"emails": -1}}},
        {"plans": {"free": {"emails": 1.5}}},
        {"plans": {"free": {"limits": [1]}}},
        {"default": 3, "plans": {}},
    ],
)
def test_a_bad_file_is_an_invalid_usage_naming_it(tmp_path: Path, content: Any) -> None:
    path = write(tmp_path, content)
    with pytest.raises(InvalidUsage, match=r"cannot read plans from .*plans\.json"):
        load_plans(path)


def test_a_missing_file_is_an_invalid_usage_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidUsage, match=r"missing\.json"):
        load_plans(tmp_path / "missing.json")

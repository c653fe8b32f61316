"""The pytest plugin of the test kit (registered as ``usage_guard``): a ``usage_guard``
fixture, a :class:`~usage_guard.testing.UsageGuardKit` per test. Configure it by
overriding ``usage_guard_options`` in a ``conftest.py``::

    @pytest.fixture
    def usage_guard_options():
        return {"plans": PLANS, "default_plan": "free"}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .testing import UsageGuardKit


@pytest.fixture
def usage_guard_options() -> dict[str, Any]:
    """``UsageGuard.from_url``'s options for the ``usage_guard`` fixture (override it)."""
    return {}


@pytest.fixture
def usage_guard(usage_guard_options: dict[str, Any]) -> Iterator[UsageGuardKit]:
    """A guard on a ``memory://`` server of its own with a hand-moved clock."""
    kit = UsageGuardKit(**usage_guard_options)
    yield kit
    kit.close()

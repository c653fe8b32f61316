"""The package surface: light to import, every export resolves, a version to report."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from importlib.metadata import version

import pytest

import usage_guard
from conftest import USAGE_GUARD

OPTIONAL = ("jinja2", "limits", "fastapi", "flask")


@pytest.mark.parametrize(
    "statement",
    [
        "import usage_guard",
        "from usage_guard import UsageGuard, AsyncUsageGuard, UsageGuardMiddleware, metered",
        "import usage_guard.cli",
    ],
)
def test_importing_the_core_loads_no_optional_dependency(statement: str) -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{statement}; import sys, json; print(json.dumps(sorted(sys.modules)))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    modules = set(json.loads(loaded))
    assert not {m for m in modules if m.split(".")[0] in OPTIONAL}
    # Not opentelemetry itself: redis-py 8 imports its SDK whenever it is installed.
    assert "usage_guard.otel" not in modules


def test_every_export_resolves_and_unknown_names_raise() -> None:
    # The module usage_guard.subject shares the name of the function usage_guard.subject.
    assert isinstance(importlib.import_module("usage_guard.subject"), types.ModuleType)
    assert not isinstance(usage_guard.subject, types.ModuleType)
    for name in usage_guard.__all__:
        assert getattr(usage_guard, name) is not None, name
    assert set(usage_guard.__all__) <= set(dir(usage_guard))
    with pytest.raises(AttributeError, match="no attribute 'Guard'"):
        usage_guard.Guard  # noqa: B018


def test_the_version_is_the_installed_distributions() -> None:
    assert usage_guard.__version__ == version("usage_guard")
    assert USAGE_GUARD is not None
    printed = subprocess.run([USAGE_GUARD, "--version"], check=True, capture_output=True, text=True)
    assert printed.stdout.strip() == f"usage-guard {usage_guard.__version__}"

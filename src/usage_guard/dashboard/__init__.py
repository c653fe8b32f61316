"""The Usage page: a framework-free controller (:mod:`.page`) and its Starlette app (:mod:`.app`);
the Flask blueprint and the Django URLs live with their integrations.

Needs the ``dashboard`` extra (jinja2); its formatting helpers do not, so the names
below load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Identify, usage_app
    from .page import IsAdmin, PageRequest, PageResponse, UsagePage

__all__ = ["Identify", "IsAdmin", "PageRequest", "PageResponse", "UsagePage", "usage_app"]
_HOMES = {"Identify": "app", "usage_app": "app"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'usage_guard.dashboard' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_HOMES.get(name, 'page')}", __name__), name)

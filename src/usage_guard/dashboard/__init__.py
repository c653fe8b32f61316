"""The Usage page as a mountable Starlette app: JSON, server-rendered HTML and admin endpoints.

Needs the ``dashboard`` extra (jinja2); its formatting helpers do not, so the names
below load on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Identify, IsAdmin, usage_app

__all__ = ["Identify", "IsAdmin", "usage_app"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'usage_guard.dashboard' has no attribute {name!r}")
    from . import app

    return getattr(app, name)

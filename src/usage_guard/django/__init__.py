"""Django: ``"usage_guard.django"`` in ``INSTALLED_APPS``, the middleware, ``settings.USAGE_GUARD``
and the Usage page's URLs.

.. code-block:: python

    INSTALLED_APPS = [..., "usage_guard.django"]
    MIDDLEWARE = [..., "usage_guard.django.UsageGuardMiddleware"]
    USAGE_GUARD = {"GUARD": "myproject.usage.guard", "IDENTIFY": "myproject.usage.identify"}
    # urls.py
    path("settings/usage/", include("usage_guard.django.urls"))

Importing this package does not need configured settings; its names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .middleware import UsageGuardMiddleware

__all__ = ["UsageGuardMiddleware"]


def __getattr__(name: str) -> Any:
    if name != "UsageGuardMiddleware":
        raise AttributeError(f"module 'usage_guard.django' has no attribute {name!r}")
    from .middleware import UsageGuardMiddleware

    return UsageGuardMiddleware

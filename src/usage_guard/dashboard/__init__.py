"""The Usage page as a mountable Starlette app: JSON, server-rendered HTML and admin endpoints."""

from .app import Identify, IsAdmin, usage_app

__all__ = ["Identify", "IsAdmin", "usage_app"]

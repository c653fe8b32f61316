"""Who is consuming: what an ``identify`` callable returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subject:
    """An organization, and optionally the user acting in it."""

    org: str
    user: str | None = None

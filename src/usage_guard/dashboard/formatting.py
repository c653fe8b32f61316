"""Numbers for people: ``1.2 M tokens``, ``3.4 GB``, ``8,500 emails``. Shared by page and CLI."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

_COUNT_STEPS = ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K"))
_BYTE_STEPS = ((10**15, "PB"), (10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))


def _scaled(value: int, divisor: int) -> str:
    scaled = value / divisor
    # One decimal while it says something (1.2 M), none from 100 up (250 M).
    text = f"{scaled:.0f}" if scaled >= 100 else f"{scaled:.1f}"
    return text.removesuffix(".0")


def compact(value: int) -> str:
    """``950``, ``8,500``, ``12.3 K``, ``1.2 M``: full digits below 10,000, then scaled."""
    if abs(value) < 10_000:
        return f"{value:,}"
    for divisor, suffix in _COUNT_STEPS:
        if abs(value) >= divisor:
            return f"{_scaled(value, divisor)} {suffix}"
    return f"{value:,}"


def quantity(value: int | None, unit: str) -> str:
    """A value with its unit: bytes in decimal units (``3.4 GB``), counts compacted."""
    if value is None:
        return "Unlimited"
    if unit == "bytes":
        for divisor, suffix in _BYTE_STEPS:
            if value >= divisor:
                return f"{_scaled(value, divisor)} {suffix}"
        return f"{value} B"
    return f"{compact(value)} {unit}".rstrip()


def figure(value: int, unit: str) -> str:
    """A value to read next to a quantity in the same unit: ``10.4 K`` (of 10 K contacts);
    bytes keep their own unit (``3.4 GB`` of 10 GB)."""
    return quantity(value, unit) if unit == "bytes" else compact(value)


def percent(value: float) -> str:
    """``85%``, ``79.99%``, ``1,250%``: the report's two decimals without trailing zeros."""
    return f"{value:,.2f}".rstrip("0").rstrip(".") + "%"


def resets_in(moment: datetime, now: datetime) -> str:
    """``resets in 12 days``, ``resets in 5 hours``: when a monthly meter starts again."""
    seconds = (moment - now).total_seconds()
    if seconds <= 0:
        return "resets now"
    hours = math.ceil(seconds / 3600)
    if hours < 24:
        return f"resets in {hours} hour{'' if hours == 1 else 's'}"
    days = math.ceil(seconds / 86400)
    return f"resets in {days} day{'' if days == 1 else 's'}"


def month(key: str) -> str:
    """``Nov`` for ``2026-11``; January also names its year (``Jan 2027``) to mark the turn."""
    year, number = key.split("-")
    name = datetime(int(year), int(number), 1).strftime("%b")
    return f"{name} {year}" if number == "01" else name


def day(moment: datetime) -> str:
    """``Dec 1, 2026``."""
    return f"{moment:%b} {moment.day}, {moment.year}"


def period_range(start: datetime, end: datetime) -> str:
    """``Nov 1 - Nov 30, 2026`` (with an en dash) for a period from ``start`` to ``end``."""
    last = end - timedelta(days=1)
    first = f"{start:%b} {start.day}" + (f", {start.year}" if start.year != last.year else "")
    return f"{first} \N{EN DASH} {day(last)}"

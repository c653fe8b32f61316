"""Inline SVG geometry for sparklines and area charts. Pure: numbers in, path strings out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chart:
    """An SVG path pair (filled area and its top line) plus the points, in a width x height
    box whose bottom is 0 and whose top padding is ``top``."""

    width: int
    height: int
    line: str
    area: str
    points: tuple[tuple[float, float], ...]
    top: int
    pad_y: float

    def y(self, value: int) -> float:
        """Where ``value`` (e.g. a limit) lies in the box."""
        usable = self.height - 2 * self.pad_y
        return round(self.pad_y + usable - usable * value / (self.top or 1), 2)


def chart(
    values: Sequence[int],
    width: int,
    height: int,
    *,
    pad_x: float = 2.0,
    pad_y: float = 2.0,
    limit: int | None = None,
) -> Chart:
    """The line through ``values`` (scaled to the box, 0 at the bottom) and the area under it.

    The highest value, or ``limit`` when higher, touches the top padding; all zeros lie
    flat on the bottom.
    """
    top = max(*values, limit or 0)
    step = (width - 2 * pad_x) / max(1, len(values) - 1)
    usable = height - 2 * pad_y
    points = tuple(
        (round(pad_x + i * step, 2), round(pad_y + usable - usable * value / (top or 1), 2))
        for i, value in enumerate(values)
    )
    line = "M" + " L".join(f"{x},{y}" for x, y in points)
    bottom = height - pad_y
    area = f"{line} L{points[-1][0]},{bottom} L{points[0][0]},{bottom} Z"
    return Chart(width, height, line, area, points, top, pad_y)

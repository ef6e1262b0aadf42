"""Geometry for the console's small inline-SVG charts (no chart library, no script needed to read them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


LABEL_CHAR_WIDTH = 8  # SVG units per character of an axis label (the console's small font)


@dataclass(frozen=True)
class Bar:
    label: str
    value: int | float
    x: float
    y: float
    width: float
    height: float
    title: str
    show_label: bool = False


def bar_chart(points: list[tuple[str, int | float]], *, width: int = 720, height: int = 180, unit: str = "",
              fmt: Callable[[int | float], str] | None = None) -> dict:
    """Bars for (label, value) points, scaled to the largest value. Returns what _bar_chart.html draws.

    `fmt` writes a value for the tooltips and the caption's peak (default: thousands separators and `unit`).
    """
    fmt = fmt or (lambda v: f"{v:,}{unit}")
    peak = max((v for _, v in points), default=0)
    top = peak or 1  # scale; the caption shows the real peak (0 with no data, not 1)
    n = max(len(points), 1)
    slot = width / n
    bar_w = max(2.0, slot * 0.7)
    every = max(1, n // 8)  # about eight axis labels
    bars = []
    for i, (label, value) in enumerate(points):
        h = (height - 20) * value / top
        x = i * slot + (slot - bar_w) / 2
        # A label starts at its bar: one that would run past the right edge is left out.
        shown = i % every == 0 and x + LABEL_CHAR_WIDTH * len(label) <= width
        bars.append(Bar(label, value, x, height - h, bar_w, h, f"{label}: {fmt(value)}", shown))
    return {"bars": bars, "width": width, "height": height, "max": peak, "peak_label": fmt(peak)}

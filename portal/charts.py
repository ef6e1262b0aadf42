"""Geometry for the console's small inline-SVG charts (no chart library, no script needed to read them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    label: str
    value: int | float
    x: float
    y: float
    width: float
    height: float
    title: str


def bar_chart(points: list[tuple[str, int | float]], *, width: int = 720, height: int = 180, unit: str = "") -> dict:
    """Bars for (label, value) points, scaled to the largest value. Returns what _bar_chart.html draws."""
    peak = max((v for _, v in points), default=0)
    top = peak or 1  # scale; the caption shows the real peak (0 with no data, not 1)
    n = max(len(points), 1)
    slot = width / n
    bar_w = max(2.0, slot * 0.7)
    bars = []
    for i, (label, value) in enumerate(points):
        h = (height - 20) * value / top
        bars.append(Bar(label, value, i * slot + (slot - bar_w) / 2, height - h, bar_w, h, f"{label}: {value:,}{unit}"))
    return {"bars": bars, "width": width, "height": height, "max": peak, "unit": unit, "label_every": max(1, n // 8)}

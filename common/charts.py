"""Geometry for the console's small server-rendered bar charts (no chart library, no script needed to read them).

What `console/_bar_chart.html` draws from `bar_chart` / `stacked_chart`:

- x positions and widths in percent of the chart's width, y positions and heights in pixels: the SVG has no
  viewBox, so it fills the width of a desktop card or a phone without stretching its text or its bars' heights;
- a y axis with round ticks (1, 2, 2.5 or 5 × a power of ten) labelled with the unit, and gridlines;
- every slot drawn: a day with no usage is a visible zero mark, not a gap; a short series (the third day of a month)
  is drawn at a bar width for `min_slots` slots, not as three bars each a third of the chart wide;
- colours by state (`thresholds`: e.g. a quota's 80 % warning and 100 %), with the thresholds drawn as lines;
- stacked series (split by model or API key), the largest first, at most `MAX_SERIES` colours (the rest: "Other");
- the same numbers as a table (`rows`), which the template shows as the chart's table view for keyboards and screen
  readers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

Number = int | float | Decimal

PLOT_HEIGHT = 160  # pixels from the top gridline to the x axis
MAX_SERIES = 6  # colours in the console's chart palette (console.css: --chart-1 … --chart-6)
LABELS = 8  # about this many x-axis labels at desktop width; every other one of them at phone width


@dataclass(frozen=True)
class Segment:
    series: int  # index into the chart's `series` (its colour)
    y: float
    height: float
    title: str


@dataclass(frozen=True)
class Bar:
    label: str
    value: Number  # the bar's total
    x: float  # percent of the chart's width
    width: float  # percent
    y: float  # pixels (top of the bar)
    height: float  # pixels
    title: str
    show_label: bool = False
    minor_label: bool = False  # hidden at phone width
    state: str = ""  # "", "ok", or a threshold's state (e.g. "warn", "over")
    segments: tuple[Segment, ...] = ()

    @property
    def center(self) -> float:
        return self.x + self.width / 2

    @property
    def is_zero(self) -> bool:
        return not self.value


@dataclass(frozen=True)
class Tick:
    value: Number
    label: str
    y: float


@dataclass(frozen=True)
class Mark:
    value: Number
    label: str
    y: float
    state: str


@dataclass
class Chart:
    bars: list[Bar]
    ticks: list[Tick]
    height: int
    unit: str
    max: Number
    peak_label: str
    series: list[str] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (css class, text)
    rows: list[tuple[str, list[str], str]] = field(default_factory=list)  # (label, value per series, total)
    summary: str = ""

    @property
    def stacked(self) -> bool:
        return len(self.series) > 1

    def __getitem__(self, key):  # the views' tests read it as the dict it used to be
        return getattr(self, key)


def nice_step(peak: float, ticks: int = 4, resolution: float | None = None) -> float:
    """A round step (1, 2, 2.5 or 5 × 10^k) so that about `ticks` steps cover `peak`; with a `resolution` (the
    smallest amount the labels can show, e.g. 1 cent), a whole multiple of it, so no label is rounded."""
    raw = peak / ticks if peak > 0 else 0
    for k in range(-9, 19):
        for m in (1, 2, 2.5, 5):
            step = m * 10.0 ** k
            if resolution and (step < resolution * (1 - 1e-9) or abs(step / resolution - round(step / resolution)) > 1e-6):
                continue
            if step >= raw * (1 - 1e-9):
                return step
    return 10.0 ** 19  # pragma: no cover


def resolution_of(fmt: Callable[[Number], str]) -> float | None:
    """The smallest power of ten that `fmt` writes differently from 0 (0.01 for a format to two decimals)."""
    zero = fmt(0)
    for k in range(-6, 10):
        if fmt(10 ** k if k >= 0 else Decimal(10) ** k) != zero:
            return float(10 ** k) if k >= 0 else 10.0 ** k
    return None


def compact(value: Number) -> str:
    """1,200 → 1.2k, 3,000,000 → 3M, 0.5 → 0.5: short enough for an axis."""
    v = float(value)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else f"{int(v):,}"


def bar_chart(points: Sequence[tuple[str, Number]], *, unit: str = "", fmt: Callable[[Number], str] | None = None,
              height: int = PLOT_HEIGHT, thresholds: Sequence[tuple[Number, str, str]] = (), min_slots: int = 14,
              tick_fmt: Callable[[Number], str] | None = None, width: int | None = None) -> Chart:
    """One bar per (label, value). `fmt` writes a value for tooltips, the table and the caption's peak (default:
    thousands separators and `unit`). `thresholds`: (value, state, label), ascending: a bar at or above a value
    takes its state (its colour) and a line marks it. `width` is accepted for old callers and ignored (the chart
    fills its container)."""
    labels = [label for label, _ in points]
    return stacked_chart(labels, [("", [v for _, v in points])], unit=unit, fmt=fmt, height=height, thresholds=thresholds,
                         min_slots=min_slots, tick_fmt=tick_fmt)


def stacked_chart(labels: Sequence[str], series: Sequence[tuple[str, Sequence[Number]]], *, unit: str = "",
                  fmt: Callable[[Number], str] | None = None, height: int = PLOT_HEIGHT,
                  thresholds: Sequence[tuple[Number, str, str]] = (), min_slots: int = 14,
                  tick_fmt: Callable[[Number], str] | None = None) -> Chart:
    """Stacked bars: for each label, one segment per series (name, values aligned with `labels`)."""
    unit_name = unit.strip()
    tick_fmt = tick_fmt or (fmt if fmt and not unit else compact)  # the caller's format (money), else short numbers
    fmt = fmt or (lambda v: f"{v:,}{unit}")
    series = _fold_series(list(series))
    n = len(labels)
    totals = [sum((s[1][i] for s in series), 0) for i in range(n)]
    peak = max(totals, default=0)
    top_value = max([float(peak)] + [float(t[0]) for t in thresholds]) or 1.0  # no data: a scale of 1, the caption says 0
    if tick_fmt is compact:
        resolution = 1.0 if all(float(t) == int(t) for t in totals) and not thresholds else None  # whole tokens: no 0.25-token ticks
    else:
        resolution = resolution_of(tick_fmt)  # money to the cent: ticks in whole cents, never a rounded label
    step = nice_step(top_value, resolution=resolution)
    top = step * max(1, math.ceil(top_value / step - 1e-9))
    steps = int(round(top / step))

    def y_of(value: Number) -> float:
        return height - height * float(value) / top

    ticks = [Tick(_clean(step * i), tick_fmt(_clean(step * i)), round(y_of(step * i), 1)) for i in range(steps + 1)]
    slots = max(n, min_slots)
    slot = 100 / slots
    bar_w = slot * 0.7
    every = max(1, math.ceil(slots / LABELS))  # per slot, so a short series' labels do not run into each other
    bars = []
    for i, label in enumerate(labels):
        total = totals[i]
        x = i * slot + (slot - bar_w) / 2
        state = _state(total, thresholds)
        segments, base = [], 0
        for index, (name, values) in enumerate(series):
            v = values[i]
            if v:
                seg_top = y_of(base + v)
                segments.append(Segment(index, round(seg_top, 1), round(y_of(base) - seg_top, 1),
                                        f"{label}: {name + ' ' if name else ''}{fmt(v)}"))
            base += v
        shown = i % every == 0
        bars.append(Bar(label, total, round(x, 3), round(bar_w, 3), round(y_of(total), 1), round(height - y_of(total), 1),
                        f"{label}: {fmt(total)}" + (" (total)" if len(series) > 1 else ""), shown,
                        shown and (i // every) % 2 == 1, state, tuple(segments)))
    names = [name for name, _ in series]
    marks = [Mark(v, label, round(y_of(v), 1), state) for v, state, label in thresholds]
    if thresholds:
        legend = [("chart-state-ok", f"Below {fmt(thresholds[0][0])}")] + [(f"chart-state-{s}", label) for _, s, label in thresholds]
    elif len(series) > 1:
        legend = [(f"chart-s{i + 1}", name) for i, name in enumerate(names)]
    else:
        legend = []
    rows = [(label, [fmt(s[1][i]) for s in series], fmt(totals[i])) for i, label in enumerate(labels)]
    peak_at = labels[totals.index(peak)] if n and peak else ""
    summary = f"peak {fmt(peak)}" + (f" on {peak_at}" if peak_at else "") + f", {n} bar{'s' if n != 1 else ''}"
    return Chart(bars, ticks, height, unit_name, peak, fmt(peak), names if len(series) > 1 else [], marks, legend, rows, summary)


def _fold_series(series: list[tuple[str, Sequence[Number]]]) -> list[tuple[str, list[Number]]]:
    """The largest series first; past MAX_SERIES, the smallest are summed into 'Other'."""
    series = sorted(((name, list(values)) for name, values in series), key=lambda s: -sum(s[1], 0))
    if len(series) <= MAX_SERIES:
        return series
    head, rest = series[: MAX_SERIES - 1], series[MAX_SERIES - 1:]
    other = [sum(vals, 0) for vals in zip(*(s[1] for s in rest))]
    return head + [("Other", other)]


def _state(value: Number, thresholds: Sequence[tuple[Number, str, str]]) -> str:
    if not thresholds:
        return ""
    state = "ok"
    for limit, name, _ in thresholds:
        if value >= limit:
            state = name
    return state


def _clean(v: float) -> Number:
    return int(v) if float(v).is_integer() else round(v, 6)

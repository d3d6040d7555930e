"""Small hand-made SVG charts for the HTML report: no plotting library, no fonts embedded,
a few kilobytes each. Every label is escaped, since stage names come from families."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH = 1100
BAR_COLOR = "#3b6ea5"
AXIS_COLOR = "#888"


@dataclass(frozen=True)
class Bar:
    value: float
    tip: str  # shown on hover (an SVG <title>)


@dataclass(frozen=True)
class BarGroup:
    """Consecutive bars under one label, e.g. one run's time bins; `ends` label its left and right edges."""

    label: str
    bars: list[Bar]
    ends: tuple[str, str] = ("", "")


def nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above `value`: a round top for the y axis."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    return next(m * exp for m in (1, 2, 5, 10) if m * exp >= value)


def fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _svg(height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
            f'font-family="sans-serif" font-size="12"><title>{escape(title)}</title>{"".join(body)}</svg>')


def column_chart(groups: list[BarGroup], *, title: str, y_label: str, height: int = 260) -> str:
    """Vertical bars left to right, groups separated by a gap and labelled below."""
    left, right, top, bottom = 64, 12, 16, 44
    n = sum(len(g.bars) for g in groups) + max(len(groups) - 1, 0)  # one empty slot between groups
    top_value = nice_max(max((b.value for g in groups for b in g.bars), default=0))
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    slot = plot_w / max(n, 1)
    body = [f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle">{escape(y_label)}</text>']
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        body.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(top_value * frac)}</text>')
    i = 0
    for g in groups:
        start = i
        for b in g.bars:
            h = plot_h * b.value / top_value
            body.append(f'<rect x="{left + i * slot + slot * 0.1:.1f}" y="{top + plot_h - h:.1f}" width="{max(slot * 0.8, 1):.1f}" '
                        f'height="{h:.1f}" fill="{BAR_COLOR}"><title>{escape(b.tip)}</title></rect>')
            i += 1
        x0, x1 = left + start * slot, left + i * slot
        if x1 - x0 >= 120:  # room for edge labels
            body.append(f'<text x="{x0:.1f}" y="{top + plot_h + 14}" font-size="10" fill="#555">{escape(g.ends[0])}</text>'
                        f'<text x="{x1:.1f}" y="{top + plot_h + 14}" font-size="10" fill="#555" text-anchor="end">{escape(g.ends[1])}</text>')
        body.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 10}" text-anchor="middle">{escape(g.label)}</text>')
        i += 1
    body.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{AXIS_COLOR}"/>')
    return _svg(height, body, title)


def bar_list(items: list[tuple[str, float]], *, title: str, unit: str) -> str:
    """Horizontal bars, one per labelled value (e.g. samples/s per stage)."""
    label_w, right, row_h = 180, 120, 26
    height = row_h * len(items) + 12
    top_value = nice_max(max((v for _, v in items), default=0))
    plot_w = WIDTH - label_w - right
    body = []
    for k, (label, value) in enumerate(items):
        y = 6 + k * row_h
        w = plot_w * value / top_value
        body.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(label)}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 8}" fill="{BAR_COLOR}">'
                    f'<title>{escape(f"{label}: {fmt(value)} {unit}")}</title></rect>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 16}">{escape(f"{fmt(value)} {unit}")}</text>')
    return _svg(height, body, title)


def histogram(values: list[float], *, title: str, x_label: str) -> str:
    """Counts of `values` in equal-width bins between their min and max (about sqrt(n) bins, 5 to 30)."""
    bins = min(30, max(5, round(math.sqrt(len(values)))))
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    bars = [Bar(c, f"{lo + k * width:.3g} to {lo + (k + 1) * width:.3g}: {c}") for k, c in enumerate(counts)]
    label = f"{x_label}: {fmt(lo)} to {fmt(hi)} ({len(values)} images)"
    return column_chart([BarGroup(label, bars, (fmt(lo), fmt(hi)))], title=title, y_label="images", height=220)

"""SVG charts drawn on the server: usage by day and by model on a tenant's page.

Run by the admin server. Plain SVG markup with classes the bundled stylesheet colours: no
script, no inline style (the console's CSP forbids both), nothing fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from html import escape

from markupsafe import Markup

WIDTH = 720
DAY_HEIGHT = 220
BAR_HEIGHT = 22
_LEFT = 64  # room for the axis labels
_BOTTOM = 28


@dataclass(frozen=True)
class DayTokens:
    day: date
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ModelTokens:
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float


def compact(value: float) -> str:
    """12, 3.4k, 5.6M: axis and bar labels."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


def _nice_top(value: float) -> float:
    """The axis maximum: 1, 2 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    return step * 10


def usage_by_day(days: Sequence[DayTokens], title: str) -> Markup:
    """Stacked bars (input below, output above) per day, oldest left."""
    plot_w = WIDTH - _LEFT - 8
    plot_h = DAY_HEIGHT - _BOTTOM - 12
    top = _nice_top(max((d.input_tokens + d.output_tokens for d in days), default=0))
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {DAY_HEIGHT}" '
        f'width="{WIDTH}" height="{DAY_HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = 12 + plot_h * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - 8}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{compact(top * fraction)}</text>"
        )
    if days:
        slot = plot_w / len(days)
        bar = max(1.0, slot * 0.7)
        label_every = max(1, len(days) // 8)
        for i, d in enumerate(days):
            x = _LEFT + i * slot + (slot - bar) / 2
            base = 12.0 + plot_h
            for cls, value in (("input", d.input_tokens), ("output", d.output_tokens)):
                h = plot_h * value / top
                base -= h
                parts.append(
                    f'<rect class="{cls}" x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" '
                    f'height="{h:.1f}"><title>{d.day.isoformat()} {cls}: '
                    f"{value:,} tokens</title></rect>"
                )
            if i % label_every == 0:
                parts.append(
                    f'<text class="axis" x="{x + bar / 2:.1f}" y="{DAY_HEIGHT - 10}" '
                    f'text-anchor="middle">{d.day.strftime("%m-%d")}</text>'
                )
    else:
        parts.append(
            f'<text class="axis" x="{WIDTH / 2}" y="{DAY_HEIGHT / 2}" text-anchor="middle">'
            "no usage recorded</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def usage_by_model(models: Sequence[ModelTokens], title: str) -> Markup:
    """One horizontal bar per model (input and output tokens), largest first."""
    ordered = sorted(models, key=lambda m: m.input_tokens + m.output_tokens, reverse=True)
    height = max(1, len(ordered)) * (BAR_HEIGHT + 8) + 16
    label_w = 180
    plot_w = WIDTH - label_w - 150
    top = max((m.input_tokens + m.output_tokens for m in ordered), default=0) or 1
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i, m in enumerate(ordered):
        y = 8 + i * (BAR_HEIGHT + 8)
        name = m.model or "(unknown)"
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 15}" text-anchor="end">'
            f"{escape(name[:28])}</text>"
        )
        x = float(label_w)
        for cls, value in (("input", m.input_tokens), ("output", m.output_tokens)):
            w = plot_w * value / top
            parts.append(
                f'<rect class="{cls}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{BAR_HEIGHT}">'
                f"<title>{escape(name)} {cls}: {value:,} tokens</title></rect>"
            )
            x += w
        parts.append(
            f'<text class="axis" x="{x + 6:.1f}" y="{y + 15}">'
            f"{compact(m.input_tokens + m.output_tokens)} · ${m.cost_usd:,.2f}</text>"
        )
    if not ordered:
        parts.append(
            f'<text class="axis" x="{WIDTH / 2}" y="{height / 2 + 4}" text-anchor="middle">'
            "no usage this month</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))

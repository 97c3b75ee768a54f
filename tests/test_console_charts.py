"""The console's server-drawn SVG charts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta

from checkstream.console.charts import DayTokens, ModelTokens, compact, usage_by_day, usage_by_model

SVG = "{http://www.w3.org/2000/svg}"


def test_one_stacked_bar_per_day_scaled_to_the_largest() -> None:
    first = date(2026, 11, 1)
    days = [DayTokens(first + timedelta(days=i), 100 * i, 300 * i) for i in range(30)]
    svg = ET.fromstring(str(usage_by_day(days, "acme: tokens per day")))
    rects = svg.findall(f"{SVG}rect")
    assert len(rects) == 60  # input and output per day
    heights = [float(r.get("height", "0")) for r in rects]
    tallest = heights[-1] + heights[-2]  # the last day is the largest
    assert all(heights[i] + heights[i + 1] <= tallest + 0.1 for i in range(0, 60, 2))
    assert heights[0] == 0 and heights[1] == 0  # day 0 had nothing
    assert "2026-11-30 output: 8,700 tokens" in ET.tostring(svg, encoding="unicode")


def test_empty_charts_say_so() -> None:
    assert "no usage recorded" in usage_by_day([], "t")
    assert "no usage this month" in usage_by_model([], "t")


def test_model_names_chosen_by_clients_are_escaped() -> None:
    hostile = '<script>alert("x")</script>'
    markup = str(usage_by_model([ModelTokens(hostile, 10, 20, 0.5)], "t"))
    assert "<script>" not in markup
    ET.fromstring(markup)  # still well-formed
    assert re.search(r"&lt;script&gt;", markup)


def test_compact_numbers() -> None:
    assert [compact(v) for v in (12, 3_400, 5_600_000, 7_100_000_000)] == [
        "12", "3.4k", "5.6M", "7.1G"
    ]  # fmt: skip

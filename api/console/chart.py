"""The quality chart over versions, drawn on the server as SVG (no chart library, no script).

Series differ by dash pattern and marker shape as well as by name, so the chart reads without
colour; the same numbers are in a table beside it. Specificity and abstention are labelled held
out or in-sample from each version's evaluation protocol (`metrics.protocol.held_out`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 40, 10, 10, 30
MARKERS_UP_TO = 60  # markers on every point only while they do not crowd each other

SERIES = (
    ("efficacy", "Efficacy", "", "circle"),
    ("paraphrase", "Paraphrase", "7 4", "square"),
    ("specificity", "Specificity", "2 3", "triangle"),
    ("abstention", "Abstention", "10 3 2 3", "diamond"),
)


@dataclass
class Line:
    key: str
    label: str
    dash: str
    marker: str
    segments: list[str] = field(default_factory=list)  # SVG polyline points, split at gaps
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Chart:
    lines: list[Line]
    x_ticks: list[tuple[float, int]]
    y_ticks: list[tuple[float, str]]
    rows: list[dict[str, Any]]
    markers: bool
    protocol: str  # "held out", "in-sample", "mixed" or "" (no version says)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: int = HEIGHT - BOTTOM
    right: int = WIDTH - RIGHT


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def quality_chart(series: list[tuple[int, dict[str, Any]]]) -> Chart | None:
    """None when no version has a metric to draw."""
    measured = [(n, m) for n, m in series if any(_value(m, key) is not None for key, *_ in SERIES)]
    if not measured:
        return None
    first, last = measured[0][0], measured[-1][0]
    span = max(1, last - first)
    # The y axis starts at the tenth below the lowest value, so close values stay apart.
    lowest = min(v for _, m in measured for key, *_ in SERIES if (v := _value(m, key)) is not None)
    floor = max(0.0, min(0.9, math.floor(lowest * 10 - 1e-9) / 10))

    def x(number: int) -> float:
        return (
            LEFT + (WIDTH - LEFT - RIGHT) * (number - first) / span if last != first else (LEFT + WIDTH) / 2
        )

    def y(value: float) -> float:
        share = (max(floor, min(1.0, value)) - floor) / (1 - floor)
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - share)

    lines = []
    for key, label, dash, marker in SERIES:
        line = Line(key, label, dash, marker)
        current: list[str] = []
        for number, metrics in series:
            value = _value(metrics, key)
            if value is None:
                if current:
                    line.segments.append(" ".join(current))
                current = []
                continue
            point = (round(x(number), 1), round(y(value), 1))
            current.append(f"{point[0]},{point[1]}")
            line.points.append(point)
        if current:
            line.segments.append(" ".join(current))
        if line.points:
            lines.append(line)
    step = max(1, span // 8)
    x_ticks = [(round(x(n), 1), n) for n in range(first, last + 1, step)]
    y_ticks = [(round(y(v), 1), f"{v:.3g}") for v in (floor + (1 - floor) * i / 4 for i in range(5))]
    flags = {(m.get("protocol") or {}).get("held_out") for _, m in measured} - {None}
    protocol = (
        "" if not flags else "mixed" if len(flags) > 1 else "held out" if flags == {True} else "in-sample"
    )
    rows = [
        {
            "number": n,
            "cells": [_value(m, key) for key, *_ in SERIES],
            "held_out": (m.get("protocol") or {}).get("held_out"),
        }
        for n, m in measured
    ]
    return Chart(lines, x_ticks, y_ticks, rows, markers=len(measured) <= MARKERS_UP_TO, protocol=protocol)

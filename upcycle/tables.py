"""Figures and markdown tables as the card, the method tables and the harness print them."""

from __future__ import annotations

import math


def is_figure(value: object) -> bool:
    """A number or null (what the JSON records hold for a figure that could not be computed)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def finite_number(value: object) -> float | None:
    """A finite figure, else None (for "N/A", null, inf and nan)."""
    return float(value) if is_figure(value) and value is not None and math.isfinite(value) else None


def stderr_key(metric: str) -> str:
    """The key of a metric's standard error: ``m_stderr`` for ``m``, ``m_stderr,f`` for ``m,f``."""
    name, _, variant = metric.partition(",")
    return f"{name}_stderr" + (f",{variant}" if variant else "")


def figure_text(value: float | None) -> str:
    """A figure to three decimals; "-" where it could not be computed (null in the JSON)."""
    return "-" if value is None else f"{value:.3f}"


def score_text(scores: dict, metric: str) -> str:
    """A score with its standard error ("0.610 ± 0.022"), "-" when there is none."""
    value, stderr = finite_number(scores.get(metric)), finite_number(scores.get(stderr_key(metric)))
    return figure_text(value) + (f" ± {stderr:.3f}" if value is not None and stderr is not None else "")


def markdown_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """A markdown table: the header row, the rule, one row per tuple."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def layer_ranges(rows: list[tuple]) -> list[tuple]:
    """Merge consecutive layers with the same row into one ``first-last`` row (rows: (layer, *cells))."""
    merged: list[list] = []
    for layer, *cells in rows:
        if merged and merged[-1][2] == cells and merged[-1][1] == layer - 1:
            merged[-1][1] = layer
        else:
            merged.append([layer, layer, cells])
    return [(str(a) if a == b else f"{a}-{b}", *cells) for a, b, cells in merged]

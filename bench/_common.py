"""Shared by the bench modules: percentiles, summaries and the one result record run.py prints
and writes. Not a benchmark itself (run.py only runs `bench_*.py`)."""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Target:
    op: str  # one of _OPS: figure <op> value means the target is met
    value: float
    source: str  # where the target comes from, e.g. "issue: p99 under 5 ms at 1,000 drops/s"

    def met(self, figure: float) -> bool:
        return _OPS[self.op](figure, self.value)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence: always a value
    that was actually observed, so p99 of 1,000 samples is the 10th largest."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def spread(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {
        "min": float(min(values)),
        "median": float(statistics.median(values)),
        "max": float(max(values)),
    }


def slope_per_unit(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (needs two distinct xs)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def result(
    *,
    name: str,
    measured: str,
    unit: str,
    figure: float,
    samples: Sequence[float],
    samples_are: str,
    repetitions: int,
    baseline_figure: float,
    baseline: str,
    target: Target | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the report. `samples` give min/median/max (per repetition, or per one-second
    window for a sustained run: `samples_are` says which). ratio = figure / baseline_figure."""
    ratio = figure / baseline_figure if baseline_figure else math.nan
    return {
        "name": name,
        "measured": measured,
        "unit": unit,
        "figure": _clean(figure),
        "baseline_figure": _clean(baseline_figure),
        "baseline": baseline,
        "ratio": _clean(ratio),
        "repetitions": repetitions,
        "samples_are": samples_are,
        **{k: _clean(v) for k, v in spread(samples).items()},
        "target": None
        if target is None
        else {"op": target.op, "value": target.value, "source": target.source},
        "met": None if target is None or math.isnan(figure) else target.met(figure),
        "details": details or {},
    }


def _clean(value: float) -> float | None:
    """JSON has no NaN: a figure that could not be measured is null."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(float(value), 6)

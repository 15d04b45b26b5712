"""Timing helpers shared by the benchmarks: warm-up, interleaved repeats, medians, table rows.

A ratio is never computed from two separately timed series: :func:`interleaved` runs the variants
in turn (A, B, A, B, ...) and :func:`paired_ratio` takes the median of the per-round ratios, so a
burst of load from other processes hits both sides of a round instead of faking a speed-up.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    measured: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: str = "-"


@dataclass
class Stats:
    """Median and spread (inter-quartile range, min, max) of a list of samples."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        a = np.asarray(samples, dtype=float)
        q1, med, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(a.min()), float(a.max()), len(a))

    def fmt(self, unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
        """``median unit [min-max, n]``."""
        f = f"{{:.{digits}g}}"
        return (f"{f.format(self.median * scale)} {unit} "
                f"[{f.format(self.lo * scale)}-{f.format(self.hi * scale)}, n={self.n}]").replace("  ", " ")


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function ``warmup`` times (untimed), then ``repeats`` rounds of all of them in turn.

    The order inside a round alternates (A B C, then C B A, ...) so no variant always runs right
    after the same neighbour. Returns the wall seconds of each call, per name, in round order.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(timed(fns[name]))
    return out


def paired_ratio(a: list[float], b: list[float]) -> Stats:
    """Stats of the per-round ratios a_i / b_i (rounds from :func:`interleaved`)."""
    return Stats.of([x / y for x, y in zip(a, b)])


def ratio_row(name: str, times: dict[str, list[float]], ours: str, base: str, target: float | None,
              higher_is_better: bool = False, unit: str = "s", scale: float = 1.0) -> Row:
    """A row comparing ``ours`` against ``base``.

    ``higher_is_better=False``: ratio = ours / base (a slow-down, target is an upper bound).
    ``higher_is_better=True``: ratio = base / ours (a speed-up, target is a lower bound).
    """
    if higher_is_better:
        r = paired_ratio(times[base], times[ours])
        tgt = f">= {target:g}x" if target is not None else "report"
        met = "-" if target is None else ("yes" if r.median >= target else "NO")
    else:
        r = paired_ratio(times[ours], times[base])
        tgt = f"<= {target:g}x" if target is not None else "report"
        met = "-" if target is None else ("yes" if r.median <= target else "NO")
    return Row(name, Stats.of(times[ours]).fmt(unit, scale), Stats.of(times[base]).fmt(unit, scale),
               f"{r.median:.3f}x (IQR {r.q1:.3f}-{r.q3:.3f})", tgt, met)


def load_note() -> str:
    """The 1, 5 and 15 minute load averages and the CPU count, for the record."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} CPUs"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows (pipe characters in cells escaped)."""
    header = ("benchmark", "measured", "baseline", "ratio", "target", "met?")
    cells = [header] + [tuple(str(v).replace("|", "\\|") for v in (r.benchmark, r.measured, r.baseline,
                                                                     r.ratio, r.target, r.met)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    line = lambda c: "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(c) for c in cells[1:]])


def ROOT_ENV() -> dict[str, str]:  # noqa: N802 - reads like the constant it stands for
    """Environment for child processes: this one's, telemetry off."""
    return dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")

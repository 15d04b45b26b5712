"""``analysis.collect.collect`` of 1,000 finished runs x 16 classes from a sqlite MLflow store
(``--quick``: 100 runs): the store of ``benchmarks/_store.py``. Target: <= 10 s.
"""

from __future__ import annotations

from analysis.collect import collect
from benchmarks._common import Row, Stats, timed
from benchmarks._store import EXPERIMENT, fixture

NAME = "collect"


def run(quick: bool = False) -> list[Row]:
    fx = fixture(quick)
    repeats = 3
    out = {}
    collect(fx.uri, experiment_names=[EXPERIMENT])  # warm-up
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: out.__setitem__("c", collect(fx.uri, experiment_names=[EXPERIMENT]))))
        col = out["c"]
        if len(col.runs) != fx.n_finished or len(col.classes) != 16 * fx.n_finished:
            raise AssertionError(f"collect: {len(col.runs)} runs / {len(col.classes)} class rows, expected "
                                 f"{fx.n_finished} / {16 * fx.n_finished}")
    s = Stats.of(times)
    return [Row(f"analysis collect: {fx.n_finished} runs x 16 classes, sqlite", s.fmt(),
                ratio=f"{s.median / fx.n_finished * 1e3:.1f} ms/run", target="<= 10 s",
                met="yes" if s.median <= 10 else "NO")]

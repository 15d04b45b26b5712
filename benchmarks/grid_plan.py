"""Grid expansion + validation + dedup: ``study.grid.load_grid`` and ``study.launch.plan`` on a grid of
10,000 specs against a sqlite store holding 1,000 finished runs of it (``--quick``: 1,000 / 100).
See ``benchmarks/_store.py`` for the grid and the store. Targets (issue 13): load + expand + validate +
hash <= 1.5 s, and the dedup against the store (``plan``) <= 0.5 s more.
"""

from __future__ import annotations

from benchmarks._common import Row, Stats, timed
from benchmarks._store import fixture
from study.grid import load_grid
from study.launch import plan

NAME = "grid"


def run(quick: bool = False) -> list[Row]:
    fx = fixture(quick)
    repeats = 3
    load_t, plan_t, total_t = [], [], []
    plan(load_grid(fx.grid_path))  # warm-up (imports, sqlite page cache)
    for _ in range(repeats):
        out = {}
        t_load = timed(lambda: out.setdefault("grid", load_grid(fx.grid_path)))
        t_plan = timed(lambda: out.setdefault("plan", plan(out["grid"])))
        p = out["plan"]
        if len(p.skip) != fx.n_finished or len(p.submit) != fx.n_specs - fx.n_finished:
            raise AssertionError(f"plan: {len(p.skip)} skipped / {len(p.submit)} to submit, expected "
                                 f"{fx.n_finished} / {fx.n_specs - fx.n_finished}")
        load_t.append(t_load)
        plan_t.append(t_plan)
        total_t.append(t_load + t_plan)
    tot, load, dedup = Stats.of(total_t), Stats.of(load_t), Stats.of(plan_t)

    def verdict(value: float, limit: float) -> dict:  # the targets are for 10,000 specs (not --quick)
        if quick:
            return {"target": f"(<= {limit} s at 10,000)", "met": "-"}
        return {"target": f"<= {limit} s", "met": "yes" if value <= limit else "NO"}

    what = f"{fx.n_specs} specs vs {fx.n_finished} finished runs"
    return [
        Row(f"grid: load_grid + plan ({what}; store built in {fx.build_s:.0f} s, untimed)", tot.fmt(),
            **verdict(tot.median, 2.0)),
        Row(f"grid: load_grid (load + expand + validate + hash, {fx.n_specs} specs)", load.fmt(),
            ratio=f"{load.median / fx.n_specs * 1e6:.0f} us/spec",
            **verdict(load.median, 1.5)),
        Row("grid: launch.plan (store + experiment + dedup query)", dedup.fmt(),
            **verdict(dedup.median, 0.5)),
    ]

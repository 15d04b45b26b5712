"""Grid expansion + validation + dedup: ``study.grid.load_grid`` and ``study.launch.plan`` on a grid of
10,000 specs against a sqlite store holding 1,000 finished runs of it (``--quick``: 1,000 / 100).
See ``benchmarks/_store.py`` for the grid and the store. Target: <= 2 s for both together.
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
    tot = Stats.of(total_t)
    what = f"{fx.n_specs} specs vs {fx.n_finished} finished runs"
    return [
        Row(f"grid: load_grid + plan ({what}; store built in {fx.build_s:.0f} s, untimed)", tot.fmt(),
            target="<= 2 s", met="yes" if tot.median <= 2.0 else "NO"),
        Row("grid: load_grid (expand + validate + hash)", Stats.of(load_t).fmt(),
            ratio=f"{Stats.of(load_t).median / fx.n_specs * 1e6:.0f} us/spec"),
        Row("grid: launch.plan (store + experiment + one paginated search + dedup)", Stats.of(plan_t).fmt()),
    ]

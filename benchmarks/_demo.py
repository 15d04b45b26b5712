"""The demo run spec the data, harness and memory benchmarks use, with data and store redirected.

Source, first found: the first run of ``grids/demo.yaml``; ``specs/texdigits_recall.yaml``; else the
schema defaults at texdigits 128x256, batch 4. The texdigits data are generated once under
``.bench/data`` (git-ignored) and reused.
"""

from __future__ import annotations

from pathlib import Path

from study.spec import RunSpec, from_dict, load_spec, to_dict

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
DATA_ROOT = BENCH_DIR / "data"


def demo_source() -> tuple[RunSpec, str]:
    grid = ROOT / "grids" / "demo.yaml"
    if grid.is_file():
        from study.grid import load_grid

        return load_grid(grid).runs[0].spec, "grids/demo.yaml (first run)"
    spec = ROOT / "specs" / "texdigits_recall.yaml"
    if spec.is_file():
        return load_spec(spec), "specs/texdigits_recall.yaml"
    raw = {"data": {"name": "texdigits", "texdigits": {"height": 128, "width": 256}},
           "train": {"batch_size": 4}}
    return from_dict(raw), "defaults (texdigits 128x256, batch 4)"


def demo_spec(store_dir: Path | None = None, **train) -> tuple[RunSpec, str]:
    """The demo spec with data under ``.bench/data``, 2 threads, the store and checkpoints in
    ``store_dir`` (if given) and ``train`` keys overridden."""
    spec, source = demo_source()
    raw = to_dict(spec)
    raw["data"]["root"] = str(DATA_ROOT)
    raw["train"]["threads"] = 2
    raw["train"]["device"] = "cpu"
    raw["train"].update(train)
    if store_dir is not None:
        raw["tracking"]["uri"] = f"sqlite:///{store_dir}/mlflow.db"
        raw["tracking"]["checkpoint_root"] = str(store_dir / "checkpoints")
        raw["tracking"]["experiment"] = "bench"
    return from_dict(raw, "<benchmark demo spec>"), source

"""A big grid file and a sqlite MLflow store of finished runs, shared by the grid and collect benchmarks.

The grid (``grid.yaml``) is the demo base with axes loss (10) x seed x lr (10): 10,000 specs, or
1,000 with ``quick``. The store holds finished runs for the first 1,000 (``quick``: 100) specs of
the grid, logged as the trainer logs them (docs/architecture.md): the ``study.*`` tags, the
flattened spec as params, ``val/`` and ``test/`` summary and per-class metrics for the 16 SYNTHIA
classes and a short ``train/loss`` curve. Everything lives under ``/dev/shm`` when it exists.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from benchmarks._demo import demo_source
from study.data.synthia import SYNTHIA_CLASSES
from study.grid import Grid, load_grid
from study.spec import flatten, run_name, to_dict
from study.tracking import prepare

EXPERIMENT = "bench-grid"
LOSSES = ["ce", {"name": "weighted_ce", "params": {"scheme": "median"}}, "class_balanced",
          {"name": "focal", "params": {"gamma": 2.0}}, "lovasz", "soft_iou", "dice", "ohem", "recall",
          {"name": "recall", "params": {"ema": 0.5}}]
LRS = [1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3]


@dataclass
class Fixture:
    folder: Path
    grid_path: Path
    grid: Grid
    uri: str
    experiment_id: str
    n_specs: int
    n_finished: int
    build_s: float


_CACHE: dict[bool, Fixture] = {}


def _tmp_base() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def write_grid(folder: Path, n_seeds: int, uri: str) -> Path:
    base = to_dict(demo_source()[0])
    base.pop("loss")
    base.pop("seed")
    base["tracking"].update({"uri": uri, "experiment": EXPERIMENT})
    grid = {"name": "bench", "base": base,
            "axes": {"loss": LOSSES, "seed": list(range(n_seeds)), "train.optimizer.lr": LRS},
            "resources": {"cpus": 1, "mem_gb": 2}}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def log_finished_run(client: MlflowClient, exp_id: str, run, rng: random.Random) -> str:
    """One finished run of ``run`` (a GridRun), logged as the trainer does."""
    spec = run.spec
    names = [n.lower().replace(" ", "_") for n in SYNTHIA_CLASSES]
    tags = {"study.spec_hash": run.hash, "study.loss": spec.loss.name, "study.dataset": spec.data.name,
            "study.backbone": spec.model.backbone, "study.arch": spec.model.arch, "study.seed": str(spec.seed),
            "study.class_names": json.dumps(list(SYNTHIA_CLASSES)), "study.grid": "bench",
            "study.git_commit": "0" * 40, "study.versions": json.dumps({"torch": "bench"}),
            "study.iteration": str(spec.train.iterations)}
    created = client.create_run(exp_id, run_name=run_name(spec), tags=tags)
    rid = created.info.run_id
    ts = int(time.time() * 1000)
    step = spec.train.iterations
    metrics = []
    for split in ("val", "test"):
        for key in ("miou", "macc", "mprec", "pixel_acc", "fwiou"):
            metrics.append(Metric(f"{split}/{key}", rng.random(), ts, step))
        for kind in ("iou", "recall", "precision"):
            for name in names:
                metrics.append(Metric(f"{split}/{kind}/{name}", rng.random(), ts, step))
    for i in range(1, 6):
        metrics.append(Metric("train/loss", 2.0 / i, ts, i * step // 5))
    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
              for k, v in flatten(to_dict(spec)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100], metrics=metrics if i == 0 else [])
    client.set_terminated(rid, "FINISHED")
    return rid


def fixture(quick: bool) -> Fixture:
    """The grid file and the store (built once per process and size)."""
    if quick in _CACHE:
        return _CACHE[quick]
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="bench-store-", dir=_tmp_base()))
    atexit.register(shutil.rmtree, folder, True)
    uri, exp_id = prepare(f"sqlite:///{folder}/mlflow.db", EXPERIMENT)
    n_seeds = 10 if quick else 100
    path = write_grid(folder, n_seeds, uri)
    grid = load_grid(path)
    n_finished = 100 if quick else 1000
    client = MlflowClient(uri)
    rng = random.Random(0)
    # spread the finished runs over the grid (every k-th spec)
    stride = len(grid.runs) // n_finished
    for run in grid.runs[::stride][:n_finished]:
        log_finished_run(client, exp_id, run, rng)
    fx = Fixture(folder, path, grid, uri, exp_id, len(grid.runs), n_finished, time.perf_counter() - t0)
    _CACHE[quick] = fx
    return fx

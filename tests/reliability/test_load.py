"""Load: 16 concurrent local jobs on one store (pre-created sqlite, and a tracking server): nothing lost or misfiled."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.data.texdigits import TexDigitsParams, ensure_texdigits
from study.grid import load_grid
from study.launch import launch

from .helpers import quiet, write_grid

JOBS = 16
ITERATIONS = 2
SUMMARY = ("miou", "macc", "mprec", "pixel_acc", "fwiou")


def load_grid_file(tmp_path: Path, small, uri: str) -> Path:
    base = small(train={"iterations": ITERATIONS, "eval_interval": ITERATIONS, "log_interval": 1, "num_overlays": 1},
                 data={"texdigits": {"num_train": 4, "num_val": 2, "num_test": 2, "height": 32, "width": 48}})
    base["tracking"].update(uri=uri, log_checkpoint=False)
    # generated once here, as a real data set exists before a launch (else 16 jobs generate it at once)
    ensure_texdigits(Path(base["data"]["root"]), TexDigitsParams.from_spec(base["data"]["texdigits"]))
    return write_grid(tmp_path / "load.yaml", base, {"seed": list(range(JOBS))}, name="load")


def check_store(client: MlflowClient, grid_path: Path, tmp_path: Path) -> dict:
    """Every run present once in the right experiment, with every metric it should have written."""
    grid = load_grid(grid_path)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "study.spec_hash" in r.data.tags]
    parents = [r for r in runs if "study.grid_parent" in r.data.tags]
    assert len(children) == JOBS and len(parents) == 1 and len(runs) == JOBS + 1
    assert sorted(r.data.tags["study.spec_hash"] for r in children) == sorted(r.hash for r in grid.runs)
    others = [e for e in client.search_experiments() if e.experiment_id != exp.experiment_id]
    assert all(client.search_runs([e.experiment_id]) == [] for e in others), "runs misfiled in another experiment"
    written = expected = 0
    for r in children:
        seed = r.data.tags["study.seed"]
        assert r.info.status == "FINISHED" and r.data.params["seed"] == seed
        assert r.info.run_name == f"s{seed}/ce/mobilenet_v3_small/texdigits"  # the varying axis first
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        want: dict[str, list[int]] = {"train/loss": list(range(1, ITERATIONS + 1)),
                                      "train/lr": list(range(1, ITERATIONS + 1))}
        for split in ("val", "test"):
            want.update({f"{split}/{k}": [ITERATIONS] for k in SUMMARY})
        # per-class test metrics: every finite value of the job's own per-class CSV artifact must be a metric
        table = Path(client.download_artifacts(r.info.run_id, "metrics/per_class_test.csv", str(tmp_path)))
        for row in csv.DictReader(table.open()):
            for kind in ("iou", "recall", "precision"):
                if not math.isnan(float(row[kind])):
                    key = f"test/{kind}/{row['class']}"
                    want[key] = [ITERATIONS]
                    assert r.data.metrics[key] == pytest.approx(float(row[kind]), abs=1e-6)  # CSV: 6 decimals, key
        for key, steps in want.items():
            got = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert got == steps, (seed, key, got)
            written += len(got)
            expected += len(steps)
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    return {"metrics_written": written, "metrics_expected": expected, "max_concurrent_runs": overlap}


@pytest.mark.slow
def test_sixteen_concurrent_jobs_on_sqlite(tmp_path, small, record_property):
    """16 concurrent local jobs on one pre-created sqlite store: every metric written, every run in its experiment"""
    path = load_grid_file(tmp_path, small, f"sqlite:///{tmp_path}/mlflow.db")
    t = time.perf_counter()
    summary = launch(path, executor="local", max_parallel=JOBS, folder_root=tmp_path / "submitit", log=quiet)
    launch_s = time.perf_counter() - t
    assert not summary["failed"] and len(summary["job_ids"]) == JOBS
    counts = check_store(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), path, tmp_path)
    counts["launch_s"] = round(launch_s, 1)
    assert counts["metrics_written"] == counts["metrics_expected"]
    record_property("detail", counts)


@pytest.mark.slow
def test_sixteen_concurrent_jobs_on_tracking_server(tmp_path, small, mlflow_server, record_property):
    """16 concurrent local jobs logging through one tracking server: every metric written, every run in its experiment"""
    server = mlflow_server()
    path = load_grid_file(tmp_path, small, server.uri)
    t = time.perf_counter()
    summary = launch(path, executor="local", max_parallel=JOBS, folder_root=tmp_path / "submitit", log=quiet)
    launch_s = time.perf_counter() - t
    assert not summary["failed"] and len(summary["job_ids"]) == JOBS
    counts = check_store(MlflowClient(server.uri), path, tmp_path)
    counts["launch_s"] = round(launch_s, 1)
    assert counts["metrics_written"] == counts["metrics_expected"]
    record_property("detail", counts)

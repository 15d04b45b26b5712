"""analysis.collect against a real sqlite MLflow store holding a synthetic grid with known metrics.

The helper ``log_grid`` writes runs exactly as docs/architecture.md ("MLflow conventions") says the
trainer does; the other analysis test files import it from here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from analysis import collect as collect_mod  # noqa: E402
from analysis.collect import collect, curves  # noqa: E402

CLASSES = ["road", "building", "sky", "digit_0", "digit_1"]
# pixel share of each class (deliberately not the logged order)
FREQUENCY = {"road": 20.0, "building": 50.0, "sky": 25.0, "digit_0": 3.0, "digit_1": 2.0}
# (miou, macc, mprec) base values per loss, fractions
BASE = {
    "ce": (0.600, 0.700, 0.750),
    "weighted_ce": (0.570, 0.780, 0.660),
    "class_balanced": (0.560, 0.770, 0.650),
    "recall": (0.595, 0.765, 0.700),
}
SUMMARY = ("miou", "macc", "mprec", "pixel_acc", "fwiou")
STEPS = (0, 10, 20, 30)
FAILED_SEED = 9999


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("|".join(map(str, key)).encode()))


def known_metrics(loss: str, seed: int, dataset: str) -> dict[str, float]:
    """The test-split and val-split metrics a synthetic run logs (fractions)."""
    miou, macc, mprec = BASE.get(loss, (0.5, 0.6, 0.6))
    r = rng_for(loss, seed, dataset)
    noise = r.uniform(-0.01, 0.01, size=5)
    values = dict(zip(SUMMARY, np.array([miou, macc, mprec, 0.9, 0.8]) + noise))
    out: dict[str, float] = {}
    for split, shift in (("test", 0.0), ("val", -0.02)):
        for k, v in values.items():
            out[f"{split}/{k}"] = float(v + shift)
        for cls in CLASSES:
            for m in ("iou", "recall", "precision"):
                out[f"{split}/{m}/{cls}"] = float(r.uniform(0.05, 0.95))
    return out


def weight_curve(seed: int, cls: str, step: int) -> float:
    """recall_weight/{cls} at ``step``: rarer classes keep larger weights."""
    return float(1.0 / (1.0 + step / 10.0) * (1.0 - FREQUENCY[cls] / 100.0) + 0.01 * seed)


@dataclass
class Grid:
    experiment_id: str
    parent_run_id: str
    run_ids: dict[tuple[str, int], str] = field(default_factory=dict)  # (loss, seed) -> run id
    expected: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    failed_run_id: str | None = None


def log_grid(client: MlflowClient, experiment_id: str, grid: str, dataset: str, backbone: str,
             losses: list[str], seeds: list[int], tmp: Path, *, val_only: tuple[str, ...] = (),
             artifacts: bool = True, failed: bool = True) -> Grid:
    """Log a finished grid under a parent run; one FAILED run (ce, seed FAILED_SEED) when ``failed``.

    Losses in ``val_only`` log no ``test/*`` metrics (collect must fall back to ``val/*``).
    """
    parent = client.create_run(experiment_id, run_name=f"grid/{grid}",
                               tags={"study.grid": grid})
    client.set_terminated(parent.info.run_id, "FINISHED")
    out = Grid(experiment_id, parent.info.run_id)
    specs = [(loss, s) for loss in losses for s in seeds]
    if failed:
        specs.append(("ce", FAILED_SEED))
    for loss, seed in specs:
        name = f"{loss}/{backbone}/{dataset}/s{seed}"
        spec_hash = f"{zlib.crc32(f'{grid}|{name}'.encode()):08x}"
        run = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent.info.run_id})
        rid = run.info.run_id
        tags = {
            "study.spec_hash": spec_hash, "study.loss": loss, "study.dataset": dataset,
            "study.backbone": backbone, "study.arch": "deeplabv3", "study.seed": str(seed),
            "study.class_names": json.dumps(CLASSES), "study.grid": grid,
            "study.git_commit": "0" * 40, "study.versions": json.dumps({"torch": "x"}),
            "study.iteration": str(STEPS[-1]),
        }
        params = {"loss.name": loss, "data.name": dataset, "model.backbone": backbone,
                  "model.arch": "deeplabv3", "seed": str(seed), "train.iterations": str(STEPS[-1]),
                  "loss.params.alpha": "0.5"}
        values = known_metrics(loss, seed, dataset)
        if loss in val_only:
            values = {k: v for k, v in values.items() if k.startswith("val/")}
        ts = 1_700_000_000_000
        metrics = [Metric(k, v, ts, STEPS[-1]) for k, v in values.items()]
        for i, step in enumerate(STEPS):
            metrics.append(Metric("train/loss", 2.0 / (1 + i) + 0.1 * seed, ts + step, step))
            metrics.append(Metric("train/lr", 1e-3, ts + step, step))
            if 0 < step < STEPS[-1]:  # the last eval is the summary value logged above
                metrics.append(Metric("val/miou", 0.3 + 0.1 * i + 0.01 * seed, ts + step, step))
            if loss.startswith("recall"):
                for cls in CLASSES:
                    metrics.append(Metric(f"recall_weight/{cls}", weight_curve(seed, cls, step),
                                          ts + step, step))
        if seed == FAILED_SEED:
            tags["study.failure"] = "diverged"
        client.log_batch(rid, metrics=metrics,
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        if artifacts:
            d = tmp / f"art_{rid}"
            d.mkdir(parents=True)
            r = rng_for("confusion", loss, seed)
            conf = r.integers(0, 50, size=(len(CLASSES), len(CLASSES))) + np.diag(
                r.integers(100, 300, size=len(CLASSES)))
            np.save(d / "confusion_test.npy", conf.astype(np.int64))
            pixels = [int(FREQUENCY[c] * 1000) for c in CLASSES]
            (d / "per_class_test.csv").write_text(
                "class,iou,recall,precision,f1,pixels\n"
                + "".join(f"{c},0.5,0.5,0.5,0.5,{p}\n" for c, p in zip(CLASSES, pixels)))
            client.log_artifact(rid, str(d / "confusion_test.npy"), "metrics")
            client.log_artifact(rid, str(d / "per_class_test.csv"), "metrics")
        if seed == FAILED_SEED:
            client.set_terminated(rid, "FAILED")
            out.failed_run_id = rid
            continue
        client.set_terminated(rid, "FINISHED")
        out.run_ids[(loss, seed)] = rid
        out.expected[(loss, seed)] = values
    return out


def new_store(tmp_path: Path, name: str = "study") -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri(),
                                   tags={"mlflow.experimentKind": "custom_model_development"})
    return uri, client, exp


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collect")
    uri, client, exp = new_store(tmp)
    g = log_grid(client, exp, "demo", "texdigits", "r18", ["ce", "recall", "focal"], [0, 1, 2],
                 tmp, val_only=("focal",))
    other = log_grid(client, exp, "other", "texdigits", "r18", ["ce"], [0], tmp, failed=False,
                     artifacts=False)
    return uri, g, other


def test_collect_runs_table_matches_logged_values(store):
    uri, g, other = store
    col = collect(uri, experiment_names=["study"], grid="demo")
    runs = col.runs
    # failed run, parent runs and the other grid are excluded
    assert sorted(runs["run_id"]) == sorted(g.run_ids.values())
    assert g.failed_run_id not in set(runs["run_id"])
    assert (runs["status"] == "FINISHED").all()
    assert list(runs[["dataset", "backbone", "loss", "seed"]].itertuples(index=False)) == sorted(
        [("texdigits", "r18", loss, s) for loss, s in g.run_ids], key=lambda t: t)
    for row in runs.itertuples(index=False):
        exp = g.expected[(row.loss, row.seed)]
        split = "val" if row.loss == "focal" else "test"
        assert row.metric_split == split
        for m in SUMMARY:
            assert getattr(row, m) == pytest.approx(exp[f"{split}/{m}"], abs=1e-12)
        assert row.run_name == f"{row.loss}/r18/texdigits/s{row.seed}"
        assert row.arch == "deeplabv3" and row.iteration == STEPS[-1]
        assert row.parent_run_id == g.parent_run_id and row.grid == "demo"
    assert runs["params.loss.name"].tolist() == runs["loss"].tolist()
    assert set(runs["params.train.iterations"]) == {str(STEPS[-1])}
    assert col.class_names == {"texdigits": CLASSES}


def test_collect_classes_table(store):
    uri, g, _ = store
    col = collect(uri, experiment_names=["study"], grid="demo")
    cls = col.classes
    assert len(cls) == len(col.runs) * len(CLASSES)
    # logged class order is kept inside each run
    assert cls[cls["run_id"] == col.runs["run_id"][0]]["class"].tolist() == CLASSES
    for row in cls.itertuples(index=False):
        exp = g.expected[(row.loss, row.seed)]
        split = "val" if row.loss == "focal" else "test"
        assert row.split == split
        for m in ("iou", "recall", "precision"):
            assert getattr(row, m) == pytest.approx(exp[f"{split}/{m}/{row[5]}"], abs=1e-12)


def test_collect_val_split_and_filters(store):
    uri, g, other = store
    col = collect(uri, grid="demo", split="val")
    assert (col.runs["metric_split"] == "val").all()
    row = col.runs[(col.runs["loss"] == "ce") & (col.runs["seed"] == 1)].iloc[0]
    assert row["miou"] == pytest.approx(g.expected[("ce", 1)]["val/miou"])
    # by parent run only (no experiment named): the parent's experiment is used
    by_parent = collect(uri, parent_run_id=other.parent_run_id)
    assert by_parent.runs["run_id"].tolist() == [other.run_ids[("ce", 0)]]
    # no filter: both grids, still no parents, failed run only when asked
    everything = collect(uri)
    assert len(everything.runs) == len(g.run_ids) + 1
    with_failed = collect(uri, grid="demo", include_unfinished=True)
    assert g.failed_run_id in set(with_failed.runs["run_id"])
    assert "FAILED" in set(with_failed.runs["status"])
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        collect(uri, experiment_names=["nope"])
    with pytest.raises(ValueError, match="split"):
        collect(uri, split="train")


def test_collect_empty_selection_has_columns(store):
    uri, _, _ = store
    col = collect(uri, grid="no-such-grid")
    assert col.runs.empty and col.classes.empty
    assert {"run_id", "loss", "miou", "metric_split"} <= set(col.runs.columns)


def test_curves_long_table(store):
    uri, g, _ = store
    rid = g.run_ids[("recall", 2)]
    df = curves(uri, [rid], ["train/loss", "recall_weight/sky", "missing/key"])
    assert list(df.columns) == ["run_id", "key", "step", "value"]
    sky = df[df["key"] == "recall_weight/sky"]
    assert sky["step"].tolist() == list(STEPS)
    assert sky["value"].tolist() == pytest.approx([weight_curve(2, "sky", s) for s in STEPS])
    loss = df[df["key"] == "train/loss"]["value"].tolist()
    assert loss == pytest.approx([2.0 / (1 + i) + 0.2 for i in range(len(STEPS))])
    assert "missing/key" not in set(df["key"])


def test_collect_uses_one_search_call(store, monkeypatch):
    uri, g, _ = store
    calls = []
    real = MlflowClient.search_runs

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", spy)
    monkeypatch.setattr(MlflowClient, "get_run", lambda *a, **k: pytest.fail("get_run called"))
    col = collect(uri, experiment_names=["study"], grid="demo")
    assert len(col.runs) == len(g.run_ids)
    assert len(calls) == 1


@pytest.fixture
def fast_tmp(tmp_path):
    """A RAM-backed folder when /dev/shm exists (sqlite commits on /tmp cost ~20 ms each here,
    which only slows the set-up of the timing test), else ``tmp_path``."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="analysis-timing-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_collect_200_runs_timing(fast_tmp, monkeypatch):
    """collect() of 200 runs is one search_runs query and no per-run call (its time is printed, not asserted:
    a timed assertion fails on a loaded machine)."""
    tmp_path = fast_tmp
    uri, client, exp = new_store(tmp_path)
    seeds = list(range(50))
    t0 = time.perf_counter()
    log_grid(client, exp, "big", "texdigits", "r18", list(BASE), seeds, tmp_path,
             artifacts=False, failed=False)
    t_log = time.perf_counter() - t0
    calls = {name: 0 for name in ("search_runs", "get_run", "get_metric_history", "download_artifacts")}

    def counted(name):
        real = getattr(MlflowClient, name)

        def call(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)
        return call

    for name in calls:  # the real methods run; the wrappers only count
        monkeypatch.setattr(MlflowClient, name, counted(name))
    t0 = time.perf_counter()
    col = collect(uri, grid="big")
    t_collect = time.perf_counter() - t0
    print(f"\nlogged 200 runs in {t_log:.2f} s; collect() of 200 runs x {len(CLASSES)} classes: "
          f"{t_collect:.2f} s")
    assert len(col.runs) == 200 and len(col.classes) == 200 * len(CLASSES)
    assert calls == {"search_runs": 1, "get_run": 0, "get_metric_history": 0, "download_artifacts": 0}
    assert collect_mod.SEARCH_PAGE_SIZE >= 1000

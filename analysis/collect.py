"""MLflow runs of a study -> tidy pandas tables.

Reads the conventions of ``docs/architecture.md`` ("MLflow conventions"): tags ``study.*``, params as
the flattened spec, metrics ``{split}/miou|macc|mprec|pixel_acc|fwiou`` and
``{split}/{iou,recall,precision}/{class}``. All runs come from one paginated
``MlflowClient.search_runs`` query (never one call per run); metric histories (``curves``) are read
per run and key and are meant for plots only.

Metric values are kept as logged (fractions in [0, 1]); ``analysis.tables`` reports percentages.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

SUMMARY_METRICS: tuple[str, ...] = ("miou", "macc", "mprec", "pixel_acc", "fwiou")
CLASS_METRICS: tuple[str, ...] = ("iou", "recall", "precision")
SPLITS: tuple[str, ...] = ("test", "val")
SEARCH_PAGE_SIZE = 50_000  # MLflow's maximum page size

RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "run_name", "status", "experiment_id", "parent_run_id", "grid", "spec_hash", "group",
    "loss", "loss_name", "axes", "dataset", "backbone", "arch", "seed", "iteration", "start_time", "end_time",
    "metric_split", *SUMMARY_METRICS,
)
CLASS_COLUMNS: tuple[str, ...] = (
    "run_id", "loss", "dataset", "backbone", "seed", "class", "split", *CLASS_METRICS,
)


@dataclass
class Collected:
    """``runs``: one row per run; ``classes``: one row per run x class.

    ``class_names`` maps each data set to its class names in the order the trainer logged them
    (tag ``study.class_names``), lower case with ``_`` for spaces as in the metric keys.
    """

    runs: pd.DataFrame
    classes: pd.DataFrame
    class_names: dict[str, list[str]] = field(default_factory=dict)
    tracking_uri: str | None = None


def metric_class_name(name: str) -> str:
    """Class name as it appears inside metric keys: lower case, spaces -> ``_``."""
    return name.strip().lower().replace(" ", "_")


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def _experiment_ids(client: MlflowClient, experiment_ids: Sequence[str] | None,
                    experiment_names: Sequence[str] | None,
                    parent_run_id: str | None) -> list[str]:
    ids: list[str] = [str(i) for i in (experiment_ids or [])]
    for name in experiment_names or []:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ALL))
            raise ValueError(f"experiment_names: no MLflow experiment named {name!r}; "
                             f"known experiments: {known}")
        ids.append(exp.experiment_id)
    if not ids and parent_run_id is not None:
        ids.append(client.get_run(parent_run_id).info.experiment_id)
    if not ids:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    return sorted(set(ids))


def search_all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every run matching ``filter_string``: one ``search_runs`` call per page of 50,000 runs."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=SEARCH_PAGE_SIZE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _class_names(tags: dict[str, str], metrics: dict[str, float], split: str | None) -> list[str]:
    raw = tags.get("study.class_names")
    if raw:
        try:
            return [metric_class_name(str(n)) for n in json.loads(raw)]
        except (json.JSONDecodeError, TypeError):
            pass
    if split is None:
        return []
    prefix = f"{split}/iou/"
    return sorted(k[len(prefix):] for k in metrics if k.startswith(prefix))


def collect(tracking_uri: str, experiment_ids: Sequence[str] | None = None,
            experiment_names: Sequence[str] | None = None, parent_run_id: str | None = None,
            grid: str | None = None, split: str = "test",
            include_unfinished: bool = False) -> Collected:
    """Runs of a study from the MLflow store at ``tracking_uri`` as two tidy tables.

    Selection: the given experiments (all active experiments when none is named, or the parent's
    experiment), tag ``study.grid == grid`` when given, ``mlflow.parentRunId == parent_run_id`` when
    given, status FINISHED unless ``include_unfinished``. Runs without a ``study.spec_hash`` tag
    (grid parent runs) are skipped. When several finished runs share a spec hash (a rerun), the one
    started last is kept.

    Summary metrics and per-class metrics come from ``{split}/...``; a run that has none falls back
    to ``val/...``; ``metric_split`` (runs) and ``split`` (classes) say which was used.
    """
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {list(SPLITS)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_ids = _experiment_ids(client, experiment_ids, experiment_names, parent_run_id)
    clauses = []
    if grid is not None:
        clauses.append(f"tags.`study.grid` = {_quote(grid)}")
    if parent_run_id is not None:
        clauses.append(f"tags.`mlflow.parentRunId` = {_quote(parent_run_id)}")
    if not include_unfinished:
        clauses.append("attributes.status = 'FINISHED'")
    found = search_all_runs(client, exp_ids, " and ".join(clauses)) if exp_ids else []

    fallback = [s for s in SPLITS if s != split]
    run_rows: list[dict] = []
    class_rows: list[dict] = []
    class_names: dict[str, list[str]] = {}
    for run in found:
        tags = run.data.tags
        if "study.spec_hash" not in tags:
            continue
        metrics = run.data.metrics
        used = next((s for s in (split, *fallback) if f"{s}/miou" in metrics), None)
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
            "parent_run_id": tags.get("mlflow.parentRunId"),
            "grid": tags.get("study.grid"),
            "spec_hash": tags["study.spec_hash"],
            "group": tags.get("study.group") or "|".join(
                str(tags.get(k)) for k in ("study.loss", "study.dataset", "study.backbone")),
            "loss": tags.get("study.loss"),
            "loss_name": tags.get("study.loss_name") or str(tags.get("study.loss", "")).split("(")[0],
            "axes": tags.get("study.axes") or "{}",
            "dataset": tags.get("study.dataset"),
            "backbone": tags.get("study.backbone"),
            "arch": tags.get("study.arch"),
            "seed": _int_or_none(tags.get("study.seed")),
            "iteration": _int_or_none(tags.get("study.iteration")),
            "class_counts": tags.get("study.class_counts"),
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "metric_split": used,
        }
        for m in SUMMARY_METRICS:
            row[m] = metrics.get(f"{used}/{m}", np.nan) if used else np.nan
        for key, value in run.data.params.items():
            row[f"params.{key}"] = value
        run_rows.append(row)

        names = _class_names(tags, metrics, used)
        if row["dataset"] is not None and names:
            class_names.setdefault(row["dataset"], names)
        for cls in names:
            crow = {k: row[k] for k in ("run_id", "loss", "dataset", "backbone", "seed")}
            crow["class"] = cls
            crow["split"] = used
            for m in CLASS_METRICS:
                crow[m] = metrics.get(f"{used}/{m}/{cls}", np.nan) if used else np.nan
            class_rows.append(crow)

    runs = pd.DataFrame(run_rows)
    if runs.empty:
        runs = pd.DataFrame(columns=list(RUN_COLUMNS))
    params = sorted(c for c in runs.columns if c.startswith("params."))
    runs = runs[list(RUN_COLUMNS) + params]
    for col in ("start_time", "end_time"):
        runs[col] = pd.to_datetime(runs[col], unit="ms", utc=True)
    for col in ("seed", "iteration"):
        runs[col] = runs[col].astype("Int64")
    for col in SUMMARY_METRICS:
        runs[col] = runs[col].astype(float)

    # A spec run twice (rerun after a crash, relaunch) counts once: keep the latest start.
    runs = (runs.sort_values(["spec_hash", "start_time", "run_id"])
                .drop_duplicates("spec_hash", keep="last"))
    order = ["dataset", "backbone", "loss", "seed", "run_id"]
    runs = runs.sort_values(order, na_position="last").reset_index(drop=True)

    classes = pd.DataFrame(class_rows, columns=list(CLASS_COLUMNS))
    classes = classes[classes["run_id"].isin(set(runs["run_id"]))]
    if not classes.empty:
        # keep the logged class order inside each run, runs in the order of ``runs``
        classes["_run"] = classes["run_id"].map({r: i for i, r in enumerate(runs["run_id"])})
        classes["_pos"] = classes.groupby("run_id").cumcount()
        classes = classes.sort_values(["_run", "_pos"]).drop(columns=["_run", "_pos"])
    classes["seed"] = classes["seed"].astype("Int64")
    for col in CLASS_METRICS:
        classes[col] = classes[col].astype(float)
    classes = classes.reset_index(drop=True)
    return Collected(runs=runs, classes=classes, class_names=class_names, tracking_uri=tracking_uri)


def curves(tracking_uri: str, run_ids: Iterable[str], keys: Iterable[str]) -> pd.DataFrame:
    """Metric histories as a long table ``run_id, key, step, value`` (sorted).

    One ``get_metric_history`` call per run and key (for plots only). When a step was logged more
    than once (a resumed run), the value logged last wins. Missing keys yield no rows.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    rows: list[tuple[str, str, int, int, float]] = []
    keys = list(keys)
    for run_id in run_ids:
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append((run_id, key, int(m.step), int(m.timestamp), float(m.value)))
    df = pd.DataFrame(rows, columns=["run_id", "key", "step", "timestamp", "value"])
    df = (df.sort_values(["run_id", "key", "step", "timestamp"])
            .drop_duplicates(["run_id", "key", "step"], keep="last")
            .drop(columns="timestamp").reset_index(drop=True))
    return df


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Silence MLflow's per-download progress bar (restores the previous setting)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_artifact_array(tracking_uri: str, run_id: str, path: str) -> np.ndarray | None:
    """A ``.npy`` artifact of one run (e.g. ``metrics/confusion_test.npy``), or None if absent."""
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
        if not os.path.isfile(local):
            return None
        return np.load(local, allow_pickle=False)


def load_artifact_csv(tracking_uri: str, run_id: str, path: str) -> pd.DataFrame | None:
    """A ``.csv`` artifact of one run (e.g. ``metrics/per_class_test.csv``), or None if absent."""
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001
            return None
        if not os.path.isfile(local):
            return None
        return pd.read_csv(local)

"""MLflow tracking: store and experiment set-up, run start/resume, batched logging, run lookup.

Conventions (metric, tag and artifact names) are listed in docs/architecture.md; analysis/collect.py
reads exactly those names.

Store rules measured on these machines (docs/architecture.md, "MLflow store rules"): a brand-new sqlite store must be created
by one process before concurrent jobs use it, and jobs must get the experiment *id* (concurrent
``set_experiment`` misfiles runs). :func:`prepare` does both, once, in the launcher or in ``study run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


def resolve_uri(uri: str, base: str | Path | None = None) -> str:
    """Make a sqlite URI absolute (jobs may run in another working directory); others unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            path = Path(base or os.getcwd()) / path
        return f"sqlite:///{path.resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def artifact_root_for(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside it in ``mlartifacts/``; servers choose their own."""
    db = sqlite_path(uri)
    return str(db.parent / "mlartifacts") if db else None


def prepare(uri: str, experiment: str) -> tuple[str, str]:
    """Create the store (runs migrations once) and the experiment; return (absolute uri, experiment id)."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        root = artifact_root_for(uri)
        location = f"{root}/{experiment}" if root else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another launcher
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = found.experiment_id
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return uri, exp_id


def find_experiment(uri: str, experiment: str) -> str | None:
    """The id of ``experiment`` in the store at ``uri``, or None; never creates the store or experiment."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    return found.experiment_id if found is not None else None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    return {
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
    }


def find_runs(uri: str, experiment_id: str, spec_hashes: Iterable[str] | None = None) -> dict[str, list]:
    """All runs of an experiment that carry a ``study.spec_hash`` tag, grouped by hash (newest first).

    One paginated search for the whole experiment, filtered in Python: a grid of thousands of specs
    is checked with a handful of calls, not one per spec.
    """
    client = MlflowClient(uri)
    wanted = set(spec_hashes) if spec_hashes is not None else None
    out: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string="tags.`study.spec_hash` != ''", max_results=5000, page_token=token,
            order_by=["attributes.start_time DESC"],
        )
        for run in page:
            h = run.data.tags.get("study.spec_hash")
            if h and (wanted is None or h in wanted):
                out.setdefault(h, []).append(run)
        token = page.token
        if not token:
            return out


def find_run_states(uri: str, experiment_id: str) -> dict[str, list[str]]:
    """``{spec_hash: [run status, newest first]}`` for every active run of an experiment.

    For a sqlite store this is one read-only SQL query over MLflow's ``runs`` and ``tags`` tables
    (milliseconds for thousands of runs, where ``search_runs`` loads every param and metric); for any
    other store, or if that schema ever changes, it falls back to :func:`find_runs`.
    """
    db = sqlite_path(uri)
    if db is not None and db.exists():
        import sqlite3

        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
                rows = con.execute(
                    "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.key = 'study.spec_hash' "
                    "ORDER BY r.start_time DESC", (int(experiment_id),)).fetchall()
            out: dict[str, list[str]] = {}
            for h, status in rows:
                out.setdefault(h, []).append(status)
            return out
        except (sqlite3.Error, ValueError):
            pass
    return {h: [r.info.status for r in runs] for h, runs in find_runs(uri, experiment_id).items()}


def run_state(statuses: list[str]) -> str:
    """Summarise the run statuses of one spec hash (newest first): finished | running | failed | missing."""
    if not statuses:
        return "missing"
    if "FINISHED" in statuses:
        return "finished"
    return "running" if statuses[0] in ("RUNNING", "SCHEDULED") else "failed"


class RunLogger:
    """Logs to one MLflow run through a client: params in chunks, metrics batched (asynchronously)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(uri)
        self._pending: list = []

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, tags: dict[str, str], parent_run_id: str | None = None):
        client = MlflowClient(uri)
        tags = {k: str(v) for k, v in tags.items()}  # the REST store (tracking server) takes strings only
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        return cls(uri, run.info.run_id)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable: resume must not re-log
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._retry(lambda: self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._retry(lambda: self.client.log_batch(self.run_id, tags=items[i:i + MAX_PARAMS_PER_BATCH]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics; they are written in batches by :meth:`flush` (the trainer flushes at checkpoints)."""
        ts = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())

    def pending_rows(self) -> list[tuple[str, float, int, int]]:
        """The queued metrics as plain ``(key, value, timestamp, step)`` rows (kept in a checkpoint)."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._pending]

    def log_missing(self, rows: list) -> int:
        """Write the ``(key, value, timestamp, step)`` rows whose (key, step) the run does not hold yet;
        returns how many were written (one metric-history read per distinct key)."""
        logged = {key: {m.step for m in self._retry(lambda: self.client.get_metric_history(self.run_id, key))}
                  for key in {row[0] for row in rows}}
        missing = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows if int(step) not in logged[k]]
        for i in range(0, len(missing), MAX_METRICS_PER_BATCH):
            chunk = missing[i:i + MAX_METRICS_PER_BATCH]
            self._retry(lambda: self.client.log_batch(self.run_id, metrics=chunk))
        return len(missing)

    def discard_pending(self) -> None:
        """Drop queued metrics (those logged after the last checkpoint of an interrupted run)."""
        self._pending = []

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            chunk = pending[i:i + MAX_METRICS_PER_BATCH]
            self._retry(lambda: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._retry(lambda: self.client.set_terminated(self.run_id, status=status))

    @staticmethod
    def _retry(fn, attempts: int = 6, delay: float = 1.0):
        """Retry transient store errors (server restart, sqlite lock); re-raise after ~1 minute."""
        for attempt in range(attempts):
            try:
                return fn()
            except Exception:  # noqa: BLE001 - MLflow raises many types for connection errors
                if attempt == attempts - 1:
                    raise
                time.sleep(delay * 2**attempt)

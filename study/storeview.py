"""Read-only views of a sqlite MLflow store without importing MLflow (for fast `study status`).

Each function opens the database with ``mode=ro`` (it never creates the file or a table) and reads
MLflow's own schema: ``experiments``, ``runs``, ``tags`` and ``latest_metrics``. A store that is not a
sqlite file is read through MLflow instead (:func:`runs_by_hash` falls back to ``study.tracking``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

STATUS_TAGS = ("study.spec_hash", "study.iteration", "study.heartbeat", "study.failure", "study.cancelled")
STATUS_METRICS = ("test/miou", "test/macc", "val/miou")


def sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def experiment_id(db: Path, name: str) -> str | None:
    """The id of the active experiment ``name``, or None (also when the store does not exist)."""
    if not db.exists():
        return None
    with _connect(db) as con:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                          (name,)).fetchone()
    return str(row[0]) if row else None


def _marks(n: int) -> str:
    return ",".join("?" * n)


def runs_by_hash(db: Path, exp_id: str) -> dict[str, list[dict]]:
    """``{spec_hash: [run, newest first]}``; a run is ``{run_id, status, tags, metrics}`` with the
    tags of :data:`STATUS_TAGS` and the latest values of :data:`STATUS_METRICS`."""
    with _connect(db) as con:
        runs = con.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
                           "ORDER BY start_time DESC", (int(exp_id),)).fetchall()
        ids = [r[0] for r in runs]
        tags: dict[str, dict] = {i: {} for i in ids}
        metrics: dict[str, dict] = {i: {} for i in ids}
        for run_id, key, value in con.execute(
                f"SELECT t.run_uuid, t.key, t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                f"WHERE r.experiment_id = ? AND t.key IN ({_marks(len(STATUS_TAGS))})", (int(exp_id), *STATUS_TAGS)):
            tags.setdefault(run_id, {})[key] = value
        for run_id, key, value in con.execute(
                f"SELECT m.run_uuid, m.key, m.value FROM latest_metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                f"WHERE r.experiment_id = ? AND m.key IN ({_marks(len(STATUS_METRICS))})",
                (int(exp_id), *STATUS_METRICS)):
            metrics.setdefault(run_id, {})[key] = value
    out: dict[str, list[dict]] = {}
    for run_id, status in runs:
        h = tags[run_id].get("study.spec_hash")
        if h:
            out.setdefault(h, []).append({"run_id": run_id, "status": status, "tags": tags[run_id],
                                          "metrics": metrics[run_id]})
    return out


def runs_by_hash_any(uri: str, experiment: str) -> tuple[str | None, dict[str, list[dict]]]:
    """(experiment id, runs by hash) for any store; never creates the store or the experiment."""
    db = sqlite_file(uri)
    if db is not None:
        exp_id = experiment_id(db, experiment)
        return exp_id, (runs_by_hash(db, exp_id) if exp_id is not None else {})
    from study import tracking

    exp_id = tracking.find_experiment(uri, experiment)
    if exp_id is None:
        return None, {}
    found = tracking.find_runs(uri, exp_id)
    return exp_id, {h: [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags),
                         "metrics": dict(r.data.metrics)} for r in runs] for h, runs in found.items()}

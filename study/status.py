"""Status of a grid: one row per run from the store, the runs' claims and the latest launch (read-only).

A row's ``status`` is one of

- ``finished``: the experiment holds a FINISHED run of the spec;
- ``running``: the newest run is RUNNING, a live job holds its claim (``study.claim``) or, where the
  claim cannot be seen from here, its ``study.heartbeat`` is recent;
- ``stale (no heartbeat for N min)``: RUNNING in the store but no live job holds the claim, or no
  heartbeat for :data:`STALE_AFTER_S` (the job died without closing its run);
- ``failed: <full reason>``: the newest run is FAILED or KILLED (``study cancel`` writes the reason);
- ``missing``: no run of the spec yet.

``state`` is the first word. Nothing here imports torch or MLflow for a sqlite store: the grid's
expansion is read from the cache the launcher writes (``{folder_root}/{grid}/grid.json``, valid while
the grid file's bytes are unchanged), and the store with read-only SQL (``study.storeview``). Without
a valid cache the grid is loaded and checked (``study.grid.load_grid``, which imports torch).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from study import claim as claims
from study import storeview

STALE_AFTER_S = 600


def latest_manifest(grid_name: str, folder_root: str | Path = "submitit") -> dict[str, dict]:
    """hash -> manifest row (job id, executor) of the grid's latest launch; {} when there is none."""
    base = Path(folder_root).resolve() / grid_name
    pointer = base / "latest"
    if not pointer.exists():
        return {}
    manifest = base / pointer.read_text().strip() / "jobs.json"
    if not manifest.exists():
        return {}
    return {row["hash"]: row for row in json.loads(manifest.read_text())}


# ----------------------------------------------------------------------------- the grid's runs, cached


def cache_path(grid_name: str, folder_root: str | Path = "submitit") -> Path:
    return Path(folder_root).resolve() / grid_name / "grid.json"


def grid_digest(grid_path: str | Path) -> str:
    return hashlib.sha256(Path(grid_path).read_bytes()).hexdigest()


def expansion(grid) -> dict[str, Any]:
    """What status needs of a loaded grid: store, experiment and per run hash, label, length, folder."""
    spec0 = grid.runs[0].spec
    from study.tracking import resolve_uri

    return {"name": grid.name, "digest": grid_digest(grid.path), "uri": resolve_uri(spec0.tracking.uri),
            "experiment": spec0.tracking.experiment,
            "runs": [{"hash": r.hash, "label": r.label(), "combination": r.combination,
                      "iterations": r.spec.train.iterations,
                      "folder": str(Path(r.spec.tracking.checkpoint_root).resolve() / r.spec.tracking.experiment
                                    / r.hash)} for r in grid.runs]}


def write_cache(grid, folder_root: str | Path = "submitit") -> None:
    """Called by the launcher (which has just loaded the grid): status then needs no torch."""
    path = cache_path(grid.name, folder_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(expansion(grid), default=str))


def grid_name_of(grid_path: str | Path) -> str:
    from study.spec import read_yaml

    raw = read_yaml(grid_path)
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else Path(grid_path).stem


def load_expansion(grid_path: str | Path, folder_root: str | Path = "submitit") -> dict[str, Any]:
    """The cached expansion if the grid file is unchanged since the last launch, else load the grid."""
    name = grid_name_of(grid_path)
    cache = cache_path(name, folder_root)
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("digest") == grid_digest(grid_path):
                return cached
        except ValueError:
            pass
    from study.grid import load_grid

    return expansion(load_grid(grid_path))


# ----------------------------------------------------------------------------- one row per run


def run_status(runs: list[dict], folder: str, now: float) -> tuple[str, dict | None]:
    """(status string, the run it describes) of one spec's runs (newest first); see the module docstring."""
    if not runs:
        return "missing", None
    done = next((r for r in runs if r["status"] == "FINISHED"), None)
    if done is not None:
        return "finished", done
    newest = runs[0]
    tags = newest["tags"]
    if newest["status"] in ("RUNNING", "SCHEDULED"):
        beat = float(tags.get("study.heartbeat") or 0)
        quiet_min = int((now - beat) // 60) if beat else None
        held = claims.holder(Path(folder)) is not None
        claim_visible = claims.claim_path(Path(folder)).exists()
        if held or (not claim_visible and quiet_min is not None and now - beat < STALE_AFTER_S):
            return "running", newest
        return (f"stale (no heartbeat for {quiet_min} min)" if quiet_min is not None
                else "stale (no heartbeat)"), newest
    reason = tags.get("study.cancelled") or tags.get("study.failure") or newest["status"]
    return f"failed: {reason}", newest


def _row(run: dict, found: list[dict], job: dict, now: float) -> dict[str, Any]:
    text, best = run_status(found, run["folder"], now)
    tags = best["tags"] if best else {}
    metrics = best["metrics"] if best else {}
    holder = claims.holder(Path(run["folder"])) if text == "running" else None
    return {
        "run": run["label"],
        "hash": run["hash"],
        "state": text.split(":")[0].split(" ")[0],
        "status": text,
        "iteration": int(float(tags.get("study.iteration", 0) or 0)),
        "of": run["iterations"],
        "test_miou": metrics.get("test/miou"),
        "test_macc": metrics.get("test/macc"),
        "val_miou": metrics.get("val/miou"),
        "job": (holder or {}).get("job_id") or job.get("job_id", ""),
        "executor": job.get("executor", ""),
    }


def slurm_states(rows: list[dict]) -> None:
    """Add each Slurm job's state (``study.slurm.job_states``) to the rows of Slurm jobs, if available."""
    ids = [r["job"] for r in rows if r["executor"] == "slurm" and r["job"]]
    if not ids:
        return
    try:
        from study.slurm import job_states
    except ImportError:
        return
    try:
        states = job_states(ids)
    except Exception:  # noqa: BLE001 - status must answer even when Slurm does not
        return
    for r in rows:
        if r["job"] in states:
            r["slurm"] = states[r["job"]]


def status(grid_path: str | Path, folder_root: str | Path = "submitit") -> list[dict[str, Any]]:
    """One row per run of the grid file: status, iteration reached, key metrics, job id (read-only)."""
    grid = load_expansion(grid_path, folder_root)
    _, found = storeview.runs_by_hash_any(grid["uri"], grid["experiment"])
    jobs = latest_manifest(grid["name"], folder_root)
    now = time.time()
    rows = [_row(r, found.get(r["hash"], []), jobs.get(r["hash"], {}), now) for r in grid["runs"]]
    slurm_states(rows)
    return rows

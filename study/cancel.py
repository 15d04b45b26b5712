"""`study cancel GRID [--only KEY=VALUE ...]`: stop a grid's jobs and close their runs KILLED.

For each selected run of the grid:

- a live job holding the run's claim (``study.claim``) on this host gets SIGINT (the signal submitit's
  own ``LocalJob.cancel`` sends: training stops, the run keeps its checkpoint) and, if it still holds
  the claim after ``grace_s``, SIGKILL;
- Slurm jobs of the latest launch (running or pending) are cancelled through ``study.slurm.cancel``
  (``scancel`` when that module is not available);
- once no job holds the claim, its RUNNING runs are closed ``KILLED`` with a ``study.cancelled`` tag
  saying who cancelled it and when (``study status`` shows it as ``failed: cancelled ...``).

Without ``--only`` the waiting launcher of the latest local launch gets SIGTERM too, so that it starts
none of the jobs it still holds back. A relaunch resumes cancelled runs from their checkpoints.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from study import claim as claims
from study import storeview
from study.status import latest_manifest, load_expansion


def selected(runs: list[dict], only: list[str] | None) -> list[dict]:
    """Runs whose combination has every KEY=VALUE of ``only`` (values compared as text)."""
    wanted = [item.split("=", 1) for item in only or []]
    return [r for r in runs if all(str(r["combination"].get(k.strip())) == v.strip() for k, v in wanted)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_local(folder: Path, record: dict, grace_s: float, log) -> None:
    """SIGINT the claim holder's pid, SIGKILL it if it still holds the claim after ``grace_s``."""
    pid = int(record.get("pid", 0))
    if pid <= 0 or record.get("host") != socket.gethostname():
        return
    log(f"  stopping {claims.describe(record)}")
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 60.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if claims.holder(folder) is None and not _alive(pid):
                return
            time.sleep(0.2)


def cancel_slurm(job_ids: list[str], log) -> None:
    if not job_ids:
        return
    log(f"  cancelling Slurm job(s) {' '.join(job_ids)}")
    try:
        from study.slurm import cancel
    except ImportError:
        subprocess.run(["scancel", *job_ids], check=False)
        return
    cancel(job_ids)


def close_killed(uri: str, experiment: str, hashes: set[str], reason: str) -> list[str]:
    """Close the RUNNING runs of ``hashes`` KILLED with ``study.cancelled`` = reason; their run ids."""
    exp_id, found = storeview.runs_by_hash_any(uri, experiment)
    if exp_id is None:
        return []
    from study.tracking import RunLogger

    closed = []
    for h in hashes:
        for run in found.get(h, []):
            if run["status"] in ("RUNNING", "SCHEDULED"):
                logger = RunLogger(uri, run["run_id"])
                logger.set_tags({"study.cancelled": reason})
                logger.finish("KILLED")
                closed.append(run["run_id"])
    return closed


def stop_launcher(grid_name: str, folder_root: str | Path) -> None:
    base = Path(folder_root).resolve() / grid_name
    pointer = base / "latest"
    record = base / pointer.read_text().strip() / "launcher.json" if pointer.exists() else None
    if record is None or not record.exists():
        return
    info = json.loads(record.read_text())
    if info.get("host") == socket.gethostname() and int(info.get("pid", 0)) > 0 and info["pid"] != os.getpid():
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass


def cancel(grid_path: str | Path, only: list[str] | None = None, folder_root: str | Path = "submitit",
           grace_s: float = 60.0, log=print) -> dict[str, Any]:
    """Cancel the selected runs' jobs and close their runs KILLED; returns what was done."""
    grid = load_expansion(grid_path, folder_root)
    runs = selected(grid["runs"], only)
    if not runs:
        from study.spec import SpecError

        axes = sorted({k for r in grid["runs"] for k in r["combination"]})
        raise SpecError(f"{grid_path}: --only {' '.join(only or [])}: matches no run of the grid "
                        f"(allowed: KEY=VALUE with KEY one of {', '.join(axes) or '(no axes)'})")
    if not only:
        stop_launcher(grid["name"], folder_root)
    jobs = latest_manifest(grid["name"], folder_root)
    cancel_slurm([jobs[r["hash"]]["job_id"] for r in runs
                  if jobs.get(r["hash"], {}).get("executor") == "slurm"], log)
    for r in runs:
        record = claims.holder(Path(r["folder"]))
        if record is not None:
            stop_local(Path(r["folder"]), record, grace_s, log)
    reason = (f"cancelled by `study cancel` at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
              f"({getpass.getuser()}@{socket.gethostname()})")
    closed = close_killed(grid["uri"], grid["experiment"], {r["hash"] for r in runs}, reason)
    log(f"cancelled {len(runs)} run(s) of grid {grid['name']}; closed {len(closed)} MLflow run(s) KILLED")
    return {"selected": [r["hash"] for r in runs], "closed": closed}

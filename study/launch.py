"""Launching a grid: load and check it, plan against MLflow, prepare data once, run an executor.

``launch(grid_path, executor=...)`` is the one entry point; the parts live in ``study.plan``
(dedup, data preparation, parent run), ``study.executors`` (debug / local / slurm) and
``study.status``. Relaunching a grid is always safe: finished runs are skipped and unfinished ones
resume from their checkpoints (``--fresh`` starts them over).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from study import tracking
from study.executors import EXECUTORS, Options, TrainJob, default_parallelism
from study.grid import Grid, load_grid
from study.plan import LaunchError, Plan, check_writable, parent_run, plan, prepare_data
from study.status import status, write_cache

__all__ = ["EXECUTORS", "LaunchError", "Plan", "TrainJob", "default_parallelism", "launch", "plan", "status"]

SHARED_FS_TYPES = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "cifs", "smb2", "fuse.sshfs", "panfs",
                   "wekafs"}


def check_store_reachable(uri: str) -> None:
    """Refuse a sqlite store on a node-local file system when jobs may run on other nodes."""
    db = tracking.sqlite_path(uri)
    if db is None:
        return
    nodes = _slurm_nodes()
    if nodes and all(n in {"localhost", socket.gethostname(), socket.getfqdn()} for n in nodes):
        return  # a one-node cluster on this very machine shares everything
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(db.parent)], capture_output=True, text=True).stdout.strip()
    if fstype not in SHARED_FS_TYPES:
        raise LaunchError(
            f"tracking.uri {uri} is a sqlite file on a '{fstype or 'unknown'}' file system that compute nodes "
            f"may not share. Start a tracking server (`study server --host 0.0.0.0`) and launch with "
            f"--set tracking.uri=http://HOST:5000, or put the store on a shared file system."
        )


def _slurm_nodes() -> list[str]:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%n"], capture_output=True, text=True, timeout=20)
        return sorted({n.strip() for n in out.stdout.split() if n.strip()})
    except (OSError, subprocess.SubprocessError):
        return []


def submitit_folder(grid: Grid, root: str | Path = "submitit") -> Path:
    """A fresh folder per launch (a reset cluster reuses job ids), with a ``latest`` pointer."""
    base = Path(root).resolve() / grid.name
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:  # mkdir is the test: two launchers in the same second get different folders
        folder = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
    (base / "latest").write_text(folder.name)
    return folder


def _dry_run(p: Plan, log) -> None:
    for r in p.grid.runs:
        state = p.states[r.hash]
        action = "skip" if state == "finished" else ("resume/retry" if state in ("failed", "running") else "submit")
        if r.hash in p.held:
            action = "held"
        log(f"  {action:12s} {r.hash}  {r.label()}" + (f"  by live {p.held[r.hash]}" if r.hash in p.held else ""))


def launch(grid_path: str | Path, executor: str = "local", fresh: bool = False, dry_run: bool = False,
           max_parallel: int | None = None, wait: bool = True, folder_root: str | Path = "submitit",
           log=print) -> dict[str, Any]:
    """Launch a grid; returns a summary dict (submitted, skipped, failed run hashes, job ids)."""
    if executor not in EXECUTORS:
        raise LaunchError(f"executor {executor!r} is not one of: {', '.join(EXECUTORS)}")
    grid = load_grid(grid_path)
    if executor == "slurm" and not dry_run:
        if shutil.which("sbatch") is None:
            raise LaunchError("executor 'slurm' needs Slurm's sbatch on PATH; use --executor local")
        check_store_reachable(tracking.resolve_uri(grid.runs[0].spec.tracking.uri))
    if not dry_run:
        for root in sorted({str(Path(r.spec.tracking.checkpoint_root).resolve()) for r in grid.runs}):
            check_writable(root, str(grid.path))
    p = plan(grid, create=False)  # read-only first: a grid refused below leaves the store untouched
    if not dry_run and p.submit:
        prepare_data(p.submit, log, str(grid.path))
        p = plan(grid, create=True)
    log(f"grid {grid.name}: {len(grid.runs)} runs, {len(p.skip)} finished (skipped), {len(p.held)} held by live "
        f"jobs, {len(p.submit)} to submit [store {p.uri}, experiment {p.experiment_id or '(not created yet)'}]")
    summary: dict[str, Any] = {"grid": grid.name, "total": len(grid.runs), "skipped": [r.hash for r in p.skip],
                               "submitted": [r.hash for r in p.submit], "failed": [], "job_ids": {},
                               "held": dict(p.held), "experiment_id": p.experiment_id, "uri": p.uri}
    if dry_run:
        _dry_run(p, log)
        return summary
    for h, who in p.held.items():
        log(f"  held     {h} by live {who}: not submitted")
    write_cache(grid, folder_root)
    if not p.submit:
        return summary
    parent = parent_run(p.uri, p.experiment_id, grid)
    folder = submitit_folder(grid, folder_root) if executor != "debug" else None
    if folder is not None:  # `study cancel` stops this launcher too (it would start the pending jobs)
        (folder / "launcher.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    opts = Options(fresh=fresh, max_parallel=max_parallel, wait=wait, folder=folder)
    return EXECUTORS[executor](p, parent, opts, summary, log)

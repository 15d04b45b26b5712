"""Launching a grid: dedup against MLflow, then the debug, local (capped) or Slurm executor.

Identity is the spec hash (study/spec.py). Before submitting, every spec of the grid is looked up in
the experiment: finished runs are skipped; failed, unfinished or missing ones are submitted, and a job
whose checkpoint folder holds a training state resumes it in the same MLflow run (``--fresh`` starts
them over). So relaunching a grid is always safe, and relaunching a finished grid submits nothing.

The store and experiment are created here, once, before any job starts; jobs get the experiment id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from study import tracking
from study.grid import Grid, GridError, GridRun, Resources, load_grid
from study.spec import from_dict, to_dict

EXECUTORS = ("debug", "local", "slurm")
SHARED_FS_TYPES = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "cifs", "smb2", "fuse.sshfs", "panfs", "wekafs"}


class LaunchError(RuntimeError):
    pass


class TrainJob(submitit.helpers.Checkpointable):
    """One run of a grid as a picklable callable; requeued on timeout/preemption, resuming its checkpoint."""

    def __init__(self, spec: dict, experiment_id: str, parent_run_id: str | None, grid: str | None,
                 fresh: bool = False, threads: int | None = None, gpu: int | None = None):
        self.spec = spec
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.grid = grid
        self.fresh = fresh
        self.threads = threads
        self.gpu = gpu

    def __call__(self) -> dict[str, Any]:
        if self.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        import torch

        from study.train import train

        if self.threads:
            torch.set_num_threads(self.threads)
        spec = from_dict(self.spec, "<job>")
        result = train(spec, experiment_id=self.experiment_id, parent_run_id=self.parent_run_id,
                       grid=self.grid, fresh=self.fresh, progress=False)
        return dataclasses.asdict(result)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self.fresh = False  # the requeued attempt continues from the last checkpoint
        return submitit.helpers.DelayedSubmission(self)


@dataclasses.dataclass
class Plan:
    grid: Grid
    uri: str
    experiment_id: str
    submit: list[GridRun]
    skip: list[GridRun]
    states: dict[str, str]


def plan(grid: Grid) -> Plan:
    """Create the store/experiment once and split the grid into runs to submit and runs to skip."""
    spec0 = grid.runs[0].spec
    uri, exp_id = tracking.prepare(spec0.tracking.uri, spec0.tracking.experiment)
    found = tracking.find_run_states(uri, exp_id)
    states = {r.hash: tracking.run_state(found.get(r.hash, [])) for r in grid.runs}
    submit = [r for r in grid.runs if states[r.hash] != "finished"]
    skip = [r for r in grid.runs if states[r.hash] == "finished"]
    return Plan(grid, uri, exp_id, submit, skip, states)


def preflight(grid: Grid) -> None:
    """Check, before anything is submitted or written, what a job would otherwise find missing only
    after it started: for every distinct data spec the data root and its three splits (listing files
    only; generated texdigits roots are skipped), and local pretrained weight files.

    Raises GridError naming the grid file, the combination and the key.
    """
    from study.data.cityscapes import cityscapes_samples
    from study.data.synthia import SPLITS, synthia_samples
    from study.models import imagenet_checkpoint_path

    seen: set[str] = set()
    for run in grid.runs:
        label = ", ".join(f"{k}={v}" for k, v in run.combination.items())
        where = f"{grid.path} [{label}]"
        data, model = run.spec.data, run.spec.model
        data_key = json.dumps([data.name, data.root, data.split_mode, data.split_seed, data.splits], sort_keys=True)
        if data.name != "texdigits" and data_key not in seen:
            seen.add(data_key)
            root = Path(data.root)
            if not root.is_dir():
                raise GridError(f"{where}: key 'data.root': {data.name} data folder {str(root.resolve())!r} does not exist")
            try:
                if data.name == "synthia":
                    _, samples = synthia_samples(root, data.split_mode, data.split_seed)
                else:
                    samples = {s: cityscapes_samples(root, str(data.splits.get(s, s))) for s in SPLITS}
            except (OSError, ValueError) as err:
                raise GridError(f"{where}: key 'data.root': {err}") from None
            empty = [s for s in SPLITS if not samples.get(s)]
            if empty:
                key = "data.splits" if data.name == "cityscapes" else "data.split_mode"
                raise GridError(f"{where}: key '{key}': {data.name} split {empty[0]!r} under {str(root.resolve())!r} "
                                f"is empty (split_mode {data.split_mode!r})")
        weights_key = f"pretrained:{model.backbone}:{model.pretrained}"
        if model.pretrained is not None and weights_key not in seen:
            seen.add(weights_key)
            if model.pretrained == "imagenet":
                path, url = imagenet_checkpoint_path(model.backbone)
                if not path.is_file():
                    raise GridError(f"{where}: key 'model.pretrained': ImageNet weights for {model.backbone!r} not "
                                    f"found at {str(path)!r} (copy {url} there; nothing is downloaded)")
            elif not Path(model.pretrained).is_file():
                raise GridError(f"{where}: key 'model.pretrained': weights file {model.pretrained!r} does not exist")


def parent_run(uri: str, experiment_id: str, grid: Grid) -> str:
    """The grid's parent MLflow run (created once, found again on relaunch)."""
    client = tracking.MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`study.grid_parent` = '{grid.name}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"grid:{grid.name}",
                            tags={"study.grid_parent": grid.name, "study.grid_file": str(grid.path)})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def default_parallelism(resources: Resources) -> int:
    """How many jobs this machine holds at once: by CPUs, memory and GPUs."""
    cpus = os.cpu_count() or 1
    by_cpu = max(1, cpus // max(1, resources.cpus))
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        by_mem = max(1, int(mem_gb * 0.8 // max(resources.mem_gb, 0.5)))
    except (ValueError, OSError):
        by_mem = by_cpu
    cap = min(by_cpu, by_mem)
    if resources.gpus:
        import torch

        cap = min(cap, max(1, torch.cuda.device_count() // resources.gpus))
    return cap


def _absolute_spec(run: GridRun, uri: str) -> dict:
    raw = to_dict(run.spec)
    raw["tracking"]["uri"] = uri
    raw["tracking"]["checkpoint_root"] = str(Path(run.spec.tracking.checkpoint_root).resolve())
    raw["data"]["root"] = str(Path(run.spec.data.root).resolve())
    return raw


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


def max_array_size() -> int:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if line.strip().startswith("MaxArraySize"):
                return int(line.split("=")[1].strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return 1001


def submitit_folder(grid: Grid, root: str | Path = "submitit") -> Path:
    """A fresh folder per launch (a reset cluster reuses job ids), with a ``latest`` pointer."""
    base = Path(root).resolve() / grid.name
    base.mkdir(parents=True, exist_ok=True)
    folder = base / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while folder.exists():
        n += 1
        folder = base / (time.strftime("%Y%m%d-%H%M%S") + f"-{n}")
    folder.mkdir()
    (base / "latest").write_text(folder.name)
    return folder


def _manifest(folder: Path, rows: list[dict]) -> None:
    (folder / "jobs.json").write_text(json.dumps(rows, indent=1))


def launch(grid_path: str | Path, executor: str = "local", fresh: bool = False, dry_run: bool = False,
           max_parallel: int | None = None, wait: bool = True, folder_root: str | Path = "submitit",
           log=print) -> dict[str, Any]:
    """Launch a grid; returns a summary dict (submitted, skipped, failed run names, job ids)."""
    if executor not in EXECUTORS:
        raise LaunchError(f"executor {executor!r} is not one of: {', '.join(EXECUTORS)}")
    grid = load_grid(grid_path)
    preflight(grid)
    if executor == "slurm":
        if shutil.which("sbatch") is None:
            raise LaunchError("executor 'slurm' needs Slurm's sbatch on PATH; use --executor local")
        check_store_reachable(tracking.resolve_uri(grid.runs[0].spec.tracking.uri))
    p = plan(grid)
    log(f"grid {grid.name}: {len(grid.runs)} runs, {len(p.skip)} finished (skipped), {len(p.submit)} to submit "
        f"[store {p.uri}, experiment {p.experiment_id}]")
    summary: dict[str, Any] = {"grid": grid.name, "total": len(grid.runs), "skipped": [r.hash for r in p.skip],
                               "submitted": [r.hash for r in p.submit], "failed": [], "job_ids": {},
                               "experiment_id": p.experiment_id, "uri": p.uri}
    if dry_run:
        for r in grid.runs:
            action = "skip" if r in p.skip else ("resume/retry" if p.states[r.hash] in ("failed", "running") else "submit")
            log(f"  {action:12s} {r.hash}  {', '.join(f'{k}={v}' for k, v in r.combination.items())}")
        return summary
    if not p.submit:
        return summary
    parent = parent_run(p.uri, p.experiment_id, grid)
    if executor == "debug":
        return _run_debug(p, parent, fresh, summary, log)
    folder = submitit_folder(grid, folder_root)
    if executor == "local":
        return _run_local(p, parent, fresh, folder, max_parallel, summary, log)
    return _run_slurm(p, parent, fresh, folder, max_parallel, wait, summary, log)


def _job(p: Plan, run: GridRun, parent: str, fresh: bool, threads=None, gpu=None) -> TrainJob:
    return TrainJob(_absolute_spec(run, p.uri), p.experiment_id, parent, p.grid.name, fresh, threads, gpu)


def _run_debug(p: Plan, parent: str, fresh: bool, summary: dict, log) -> dict:
    for run in p.submit:
        log(f"  running {run.hash} in-process")
        try:
            _job(p, run, parent, fresh)()
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid
            log(f"  FAILED {run.hash}: {err}")
            summary["failed"].append(run.hash)
    return summary


def _run_local(p: Plan, parent: str, fresh: bool, folder: Path, max_parallel, summary: dict, log) -> dict:
    """submitit local jobs, at most ``cap`` at once, each with cpu_count // cap torch threads."""
    res = p.grid.resources
    cap = max_parallel or res.max_parallel or default_parallelism(res)
    cap = max(1, min(cap, len(p.submit)))
    threads = max(1, (os.cpu_count() or 1) // cap)
    try:
        import torch

        gpus = torch.cuda.device_count() if res.gpus else 0
    except Exception:  # noqa: BLE001
        gpus = 0
    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=res.timeout_min, gpus_per_node=gpus or 0)
    log(f"  local executor: {cap} concurrent job(s), {threads} torch thread(s) each, folder {folder}")
    pending = list(p.submit)
    active: list[tuple[Any, GridRun, int | None]] = []
    free_gpus = list(range(gpus))
    rows = []
    while pending or active:
        while pending and len(active) < cap:
            run = pending.pop(0)
            gpu = free_gpus.pop(0) if free_gpus else None
            job = executor.submit(_job(p, run, parent, fresh, threads, gpu))
            active.append((job, run, gpu))
            summary["job_ids"][run.hash] = job.job_id
            rows.append({"hash": run.hash, "job_id": job.job_id, "combination": run.combination})
            _manifest(folder, rows)
        time.sleep(0.5)
        still = []
        for job, run, gpu in active:
            if job.done():
                if gpu is not None:
                    free_gpus.append(gpu)
                try:
                    job.result()
                    log(f"  finished {run.hash} ({', '.join(f'{k}={v}' for k, v in run.combination.items())})")
                except Exception as err:  # noqa: BLE001
                    summary["failed"].append(run.hash)
                    log(f"  FAILED {run.hash}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
            else:
                still.append((job, run, gpu))
        active = still
    return summary


def _run_slurm(p: Plan, parent: str, fresh: bool, folder: Path, max_parallel, wait: bool, summary: dict, log) -> dict:
    """One sbatch array per resource set, chunked below MaxArraySize."""
    groups: dict[tuple, list[GridRun]] = {}
    for run in p.submit:
        groups.setdefault(run.resources.key(), []).append(run)
    limit = max(1, max_array_size() - 1)
    jobs, rows = [], []
    for runs in groups.values():
        res = runs[0].resources
        extra = {k.removeprefix("slurm_"): v for k, v in res.slurm.items()}
        # requeues allowed after timeouts (submitit's default is 3); preemptions do not count
        max_timeouts = int(extra.pop("max_num_timeout", 3))
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_timeouts)
        params: dict[str, Any] = {
            "timeout_min": res.timeout_min, "cpus_per_task": res.cpus, "mem_gb": res.mem_gb,
            "name": f"study-{p.grid.name}", "slurm_array_parallelism": max_parallel or res.max_parallel or 256,
        }
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.account:
            params["slurm_account"] = res.account
        params.update({f"slurm_{k}": v for k, v in extra.items()})
        executor.update_parameters(**params)
        for start in range(0, len(runs), limit):
            chunk = runs[start:start + limit]
            with executor.batch():
                submitted = [executor.submit(_job(p, run, parent, fresh, res.cpus)) for run in chunk]
            for job, run in zip(submitted, chunk):
                jobs.append((job, run))
                summary["job_ids"][run.hash] = job.job_id
                rows.append({"hash": run.hash, "job_id": job.job_id, "combination": run.combination})
    _manifest(folder, rows)
    log(f"  submitted {len(jobs)} Slurm job(s) in {len(groups)} array group(s); folder {folder}")
    if wait:
        for job, run in jobs:
            try:
                job.result()
                log(f"  finished {run.hash} (job {job.job_id})")
            except Exception as err:  # noqa: BLE001
                summary["failed"].append(run.hash)
                log(f"  FAILED {run.hash} (job {job.job_id}): {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
    return summary


def status(grid_path: str | Path, folder_root: str | Path = "submitit") -> list[dict[str, Any]]:
    """One row per run of the grid: state, iteration reached and key metrics (MLflow + submitit)."""
    grid = load_grid(grid_path)
    spec0 = grid.runs[0].spec
    uri, exp_id = tracking.prepare(spec0.tracking.uri, spec0.tracking.experiment)
    found = tracking.find_runs(uri, exp_id, [r.hash for r in grid.runs])
    jobs: dict[str, str] = {}
    base = Path(folder_root).resolve() / grid.name
    if (base / "latest").exists():
        manifest = base / (base / "latest").read_text().strip() / "jobs.json"
        if manifest.exists():
            jobs = {row["hash"]: row["job_id"] for row in json.loads(manifest.read_text())}
    rows = []
    for r in grid.runs:
        runs = found.get(r.hash, [])
        state = tracking.run_state([x.info.status for x in runs])
        best = next((x for x in runs if x.info.status == "FINISHED"), runs[0] if runs else None)
        m = best.data.metrics if best else {}
        rows.append({
            "run": " ".join(f"{k}={v}" for k, v in r.combination.items()),
            "hash": r.hash,
            "state": state,
            "iteration": int(best.data.tags.get("study.iteration", 0)) if best else 0,
            "of": r.spec.train.iterations,
            "test_miou": m.get("test/miou"),
            "test_macc": m.get("test/macc"),
            "val_miou": m.get("val/miou"),
            "job": jobs.get(r.hash, ""),
            "failure": (best.data.tags.get("study.failure", "") if best else "")[:80],
        })
    return rows

"""Executors: one small function per way of running a grid's jobs (as DomainBed's command launchers).

``EXECUTORS[name](plan, parent_run_id, options, summary, log) -> summary`` runs ``plan.submit``:

- ``debug``: in this process, one after the other;
- ``local``: submitit local jobs, at most ``cap`` at once, torch threads split between them;
- ``slurm``: one sbatch array per resource set, chunked below ``MaxArraySize``; a timeout or
  preemption requeues the job, which continues the same MLflow run from its checkpoint.

With ``resources.runs_per_gpu: k`` (local and Slurm) a job trains k runs at once, one process each
(``study.packing.PackedJob``); the manifest lists the job id of every run, so ``study status`` shows
which job holds which runs.

Each job is a :class:`TrainJob`: the resolved spec object itself (it pickles) and its hash,
computed once by the launcher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from study.grid import GridRun
from study.packing import packs
from study.plan import Plan, absolute


@dataclasses.dataclass
class Options:
    fresh: bool = False
    max_parallel: int | None = None
    wait: bool = True
    folder: Path | None = None


class TrainJob(submitit.helpers.Checkpointable):
    """One run of a grid as a picklable callable; requeued on timeout/preemption, resuming its checkpoint."""

    def __init__(self, spec, h: str, experiment_id: str, parent_run_id: str | None, grid: str | None,
                 axes: dict | None = None, fresh: bool = False, threads: int | None = None, gpu: int | None = None):
        self.spec, self.h, self.axes = spec, h, axes
        self.experiment_id, self.parent_run_id, self.grid = experiment_id, parent_run_id, grid
        self.fresh, self.threads, self.gpu = fresh, threads, gpu

    def __call__(self) -> dict[str, Any]:
        if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
            detach_from_terminal()
        if self.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        import torch

        from study.train import train

        if self.threads:
            torch.set_num_threads(self.threads)
        result = train(self.spec, experiment_id=self.experiment_id, parent_run_id=self.parent_run_id,
                       grid=self.grid, axes=self.axes, fresh=self.fresh, progress=False, h=self.h)
        return dataclasses.asdict(result)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self.fresh = False  # the requeued attempt continues from the last checkpoint
        return submitit.helpers.DelayedSubmission(self)


def detach_from_terminal() -> None:
    """A local job leaves the launcher's process group, so a Ctrl-C typed at the launcher's terminal
    reaches only the launcher; SIGINT sent to the job itself (``study cancel``, submitit's cancel) still
    stops it. (The launcher starts jobs with SIGINT ignored, see :func:`submit_ignoring_sigint`.)"""
    try:
        os.setsid()
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)


def submit_ignoring_sigint(executor, job):
    """Submit with SIGINT ignored: submitit's local controller process inherits that disposition and so
    survives a terminal Ctrl-C meant for the launcher (the job restores its own handler)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return executor.submit(job)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return executor.submit(job)
    finally:
        signal.signal(signal.SIGINT, previous)


def job_for(p: Plan, run: GridRun, parent: str, fresh: bool, threads=None, gpu=None) -> TrainJob:
    return TrainJob(absolute(run, p.uri), run.hash, p.experiment_id, parent, p.grid.name, run.axes, fresh,
                    threads, gpu)


def _reason(err: BaseException) -> str:
    """The job's own error line: submitit wraps the job's traceback between dashed lines and ends its
    message with log paths, so the reason is the last line of the traceback part."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    cuts = [i for i, ln in enumerate(lines) if set(ln) == {"-"}]
    if len(cuts) >= 2:
        lines = lines[cuts[0] + 1:cuts[1]]
    return lines[-1] if lines else type(err).__name__


def outcome(result: Any) -> str:
    """``finished``, or why the job trained nothing (``held by live job ...`` / ``already finished``)."""
    skipped = result.get("skipped") if isinstance(result, dict) else ""
    return skipped or "finished"


def record_outcome(summary: dict, run: GridRun, result: Any) -> str:
    word = outcome(result)
    if word.startswith("held"):
        summary.setdefault("held", {})[run.hash] = word.removeprefix("held by live ")
    return word


def write_manifest(folder: Path, rows: list[dict]) -> None:
    (folder / "jobs.json").write_text(json.dumps(rows, indent=1))


def run_debug(p: Plan, parent: str, opts: Options, summary: dict, log) -> dict:
    for run in p.submit:
        log(f"  running {run.hash} in-process ({run.label()})")
        try:
            word = record_outcome(summary, run, job_for(p, run, parent, opts.fresh)())
            log(f"  {word} {run.hash}" if word == "finished" else f"  skipped  {run.hash}: {word}")
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the grid
            log(f"  FAILED {run.hash}: {_reason(err)}")
            summary["failed"].append(run.hash)
    return summary


def default_parallelism(resources) -> int:
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


def _gpu_count(res) -> int:
    if not res.gpus:
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def job_for_pack(p: Plan, pack: list[GridRun], parent: str, fresh: bool, threads=None, gpu=None):
    """One run: its TrainJob; several (``resources.runs_per_gpu``): a PackedJob training them at once."""
    from study.packing import PackedJob

    jobs = [job_for(p, run, parent, fresh, threads, gpu) for run in pack]
    return jobs[0] if len(jobs) == 1 else PackedJob(jobs)


def pack_results(pack: list[GridRun], job) -> list[tuple[GridRun, Any, BaseException | None]]:
    """(run, result, error) for every run of a finished job, packed or not."""
    try:
        result = job.result()
    except Exception as err:  # noqa: BLE001 - the whole job failed
        return [(run, None, err) for run in pack]
    if len(pack) == 1:
        return [(pack[0], result, None)]
    out = []
    for run in pack:
        r = result.get(run.hash, {"ok": False, "error": "no result"})
        out.append((run, r.get("result"), None if r["ok"] else RuntimeError(r["error"])))
    return out


def _log_outcomes(summary: dict, pack: list[GridRun], job, log, counter: list[int], total: int, to_go: int) -> None:
    for run, result, err in pack_results(pack, job):
        counter[0] += 1
        n = f"[{counter[0]}/{total} done, {to_go} to go, {len(summary['failed']) + (err is not None)} failed]"
        if err is not None:
            summary["failed"].append(run.hash)
            log(f"  FAILED   {run.hash} ({run.label()}): {_reason(err)}  {n}")
            continue
        word = record_outcome(summary, run, result)
        text = "finished" if word == "finished" else f"skipped: {word}"
        log(f"  {text} {run.hash} ({run.label()})  {n}")


def run_local(p: Plan, parent: str, opts: Options, summary: dict, log) -> dict:
    """submitit local jobs, at most ``cap`` at once, each with cpu_count // cap torch threads; with
    ``resources.runs_per_gpu: k`` a job trains k runs at once (``study.packing``)."""
    res = p.grid.resources
    pending = packs(p.submit, res.runs_per_gpu)
    cap = max(1, min(opts.max_parallel or res.max_parallel or default_parallelism(res), len(pending)))
    threads = max(1, (os.cpu_count() or 1) // (cap * res.runs_per_gpu))
    gpus = _gpu_count(res)
    executor = submitit.LocalExecutor(folder=str(opts.folder))
    executor.update_parameters(timeout_min=res.timeout_min, gpus_per_node=gpus)
    log(f"  local executor: {cap} concurrent job(s) of {res.runs_per_gpu} run(s), {threads} torch thread(s) "
        f"per run, folder {opts.folder}")
    active, free_gpus, rows, counter = [], list(range(gpus)), [], [0]
    while pending or active:
        while pending and len(active) < cap:
            pack = pending.pop(0)
            gpu = free_gpus.pop(0) if free_gpus else None
            job = submit_ignoring_sigint(executor, job_for_pack(p, pack, parent, opts.fresh, threads, gpu))
            active.append((job, pack, gpu))
            for run in pack:
                summary["job_ids"][run.hash] = job.job_id
                rows.append({"hash": run.hash, "job_id": job.job_id, "executor": "local", "combination": run.axes})
                log(f"  started  {run.hash} job {job.job_id} ({run.label()})")
            write_manifest(opts.folder, rows)
        time.sleep(0.5)
        still = [a for a in active if not a[0].done()]
        for job, pack, gpu in [a for a in active if a[0].done()]:
            if gpu is not None:
                free_gpus.append(gpu)
            to_go = sum(len(x[1]) for x in still) + sum(len(x) for x in pending)
            _log_outcomes(summary, pack, job, log, counter, len(p.submit), to_go)
        active = still
    return summary


def max_array_size() -> int:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if line.strip().startswith("MaxArraySize"):
                return int(line.split("=")[1].strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return 1001


def _slurm_executor(p: Plan, res, folder: Path, max_parallel) -> submitit.AutoExecutor:
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
    return executor


def run_slurm(p: Plan, parent: str, opts: Options, summary: dict, log) -> dict:
    """One sbatch array per resource set, chunked below MaxArraySize."""
    groups: dict[tuple, list[GridRun]] = {}
    for run in p.submit:
        groups.setdefault(run.resources.key(), []).append(run)
    limit = max(1, max_array_size() - 1)
    jobs, rows = [], []
    for runs in groups.values():
        res = runs[0].resources
        executor = _slurm_executor(p, res, opts.folder, opts.max_parallel)
        for start in range(0, len(runs), limit):
            chunk = runs[start:start + limit]
            chunk_packs = packs(chunk, res.runs_per_gpu)
            threads = max(1, res.cpus // res.runs_per_gpu)
            with executor.batch():
                submitted = [executor.submit(job_for_pack(p, pack, parent, opts.fresh, threads)) for pack in chunk_packs]
            for job, pack in zip(submitted, chunk_packs):
                jobs.append((job, pack))
                for run in pack:
                    summary["job_ids"][run.hash] = job.job_id
                    rows.append({"hash": run.hash, "job_id": job.job_id, "executor": "slurm",
                                 "combination": run.axes})
    write_manifest(opts.folder, rows)
    log(f"  submitted {len(jobs)} Slurm job(s) in {len(groups)} array group(s); folder {opts.folder}")
    if opts.wait:
        counter = [0]
        for i, (job, pack) in enumerate(jobs):
            _log_outcomes(summary, pack, job, log, counter, len(p.submit), sum(len(x[1]) for x in jobs[i + 1:]))
    return summary


EXECUTORS: dict[str, Callable[..., dict]] = {"debug": run_debug, "local": run_local, "slurm": run_slurm}

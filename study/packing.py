"""Several runs packed into one job: ``resources.runs_per_gpu: k`` (local and Slurm executors).

A modern GPU is mostly idle under one DeepLabV3+ ResNet-18 at 384x768, batch 6, so a job may train k
specs of the grid at once on its device. :class:`PackedJob` starts each run in its own process (spawned,
so CUDA initialises per process), each with its own MLflow run, checkpoint folder, claim and progress;
a run that fails does not stop the others (its error is returned, not raised). On a timeout or
preemption submitit requeues the job and every run resumes from its own checkpoint (a finished run
is skipped by its claim). The children ask the kernel to kill them when the job process dies
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the job leaves no orphan holding a claim.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import signal
import traceback
from typing import Any

import submitit

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Child initializer: SIGKILL this process when its parent (the job) dies (Linux; else a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _run_one(job) -> dict[str, Any]:
    """Train one run in this child process; the error text instead of raising (one failure stays local)."""
    try:
        return {"ok": True, "result": job()}
    except BaseException as err:  # noqa: BLE001 - reported to the launcher per run
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


class PackedJob(submitit.helpers.Checkpointable):
    """k TrainJobs trained concurrently, one process each; returns ``{spec hash: outcome}``."""

    def __init__(self, jobs: list):
        self.jobs = jobs

    def __call__(self) -> dict[str, dict[str, Any]]:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=len(self.jobs), mp_context=ctx, initializer=_die_with_parent) as pool:
            futures = {job.h: pool.submit(_run_one, job) for job in self.jobs}
            return {h: _outcome_of(f) for h, f in futures.items()}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        for job in self.jobs:
            job.fresh = False  # the requeued attempt continues every run from its last checkpoint
        return submitit.helpers.DelayedSubmission(self)


def _outcome_of(future: cf.Future) -> dict[str, Any]:
    try:
        return future.result()
    except BaseException as err:  # noqa: BLE001 - the child died (e.g. killed): that run failed
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}


def packs(runs: list, k: int) -> list[list]:
    """Consecutive groups of at most ``k`` runs (k = 1: one run per job, as without packing)."""
    k = max(1, int(k))
    return [runs[i:i + k] for i in range(0, len(runs), k)]

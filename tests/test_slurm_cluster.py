"""Real Slurm through submitit on the one-node cluster of scripts/slurm-local.sh.

(a) `map_array` submits one sbatch job array; each task runs in Slurm (its own array task id)
    and returns the right value.
(b) preemption -> USR2 -> `Checkpointable.checkpoint` -> `scontrol requeue` -> the second attempt of
    the same Slurm job resumes from the progress saved by the first one and finishes. The test sends USR2
    itself (`scancel --signal=USR2`, to the job step as Slurm's own `--signal` does) while the first
    attempt waits at a known step, so nothing depends on how fast the machine is.
Skipped (with the reason) where the Slurm binaries or root are missing: see tests/slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import submitit

from study.slurm import cancel, job_states

pytestmark = pytest.mark.slurm


def square_in_slurm(x: int) -> dict[str, Any]:
    """Tiny array task: its result plus where Slurm ran it."""
    return {
        "x": x,
        "square": x * x,
        "executor": os.environ.get("SUBMITIT_EXECUTOR"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


class CountWithProgress(submitit.helpers.Checkpointable):
    """Counts 1..steps, appending each step to a JSON-lines file; waits after step `hold_at` until interrupted.

    A (re)start reads the file and continues after the last recorded step. The first attempt cannot finish:
    it holds after step `hold_at` (0: never) until a signal ends it. `checkpoint()` returns the same count
    without the hold, so the requeued attempt runs to the end.
    """

    def __init__(self, progress: Path, steps: int, hold_at: int = 0) -> None:
        self.progress = Path(progress)
        self.steps = steps
        self.hold_at = hold_at

    def _append(self, record: dict[str, Any]) -> None:
        with self.progress.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __call__(self) -> dict[str, Any]:
        records = read_progress(self.progress)
        done = max((r["step"] for r in records if "step" in r), default=0)
        self._append(
            {
                "start_from": done,
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            }
        )
        for step in range(done + 1, self.steps + 1):
            self._append({"step": step})
            while step == self.hold_at:  # held until USR2 (submitit's handler exits the process)
                time.sleep(0.1)
        return {"steps": self.steps, "attempts": len(read_progress(self.progress, "start_from"))}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(CountWithProgress(self.progress, self.steps), *args, **kwargs)


def read_progress(path: Path, key: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if key is None or key in r]


def wait_all(jobs: list[submitit.Job], cluster: Any, timeout_s: float) -> None:
    """Poll until every job has its result pickle; fail with squeue, job logs and daemon logs."""
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- job {j.job_id} stdout ---\n{j.stdout()}\n--- stderr ---\n{j.stderr()}" for j in jobs
            )
            pytest.fail(
                f"jobs not done after {timeout_s:.0f}s\nsqueue:\n{cluster.squeue()}\n{logs}\n{cluster.logs()}"
            )
        time.sleep(1)


def make_executor(folder: Path, cluster: Any, fn: Any, max_num_timeout: int = 3, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    executor.update_parameters(
        slurm_partition=cluster.partition,
        cpus_per_task=1,
        mem_gb=0.5,
        slurm_setup=cluster.job_setup(fn),
        **params,
    )
    return executor


def wait_for(fn: Any, want: Any, cluster: Any, timeout_s: float, what: str) -> Any:
    """Poll `fn()` every 0.5 s until `want(value)`; fail with squeue and the daemon logs after timeout_s."""
    deadline = time.monotonic() + timeout_s
    value = fn()
    while not want(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {value!r} after {timeout_s:.0f}s\nsqueue:\n{cluster.squeue()}\n{cluster.logs()}")
        time.sleep(0.5)
        value = fn()
    return value


def test_cluster_is_up(slurm_cluster: Any) -> None:
    print(f"slurm cluster start: {slurm_cluster.start_s:.2f} s")
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%P %T %N"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [f"{slurm_cluster.partition}*", "idle", "localhost"], out
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert str(slurm_cluster.conf) in config
    assert any(line.split() == ["MaxArraySize", "=", "1001"] for line in config.splitlines())


def test_map_array_runs_as_one_slurm_array(slurm_cluster: Any, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    executor = make_executor(tmp_path / "array", slurm_cluster, square_in_slurm, timeout_min=10)
    assert executor.cluster == "slurm"
    xs = [3, 5, 7]
    jobs = executor.map_array(square_in_slurm, xs)
    assert len(jobs) == 3
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]  # one sbatch array, not 3 jobs
    assert [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]
    wait_all(jobs, slurm_cluster, timeout_s=300)
    results = [job.result() for job in jobs]
    elapsed = time.perf_counter() - t0
    print(f"slurm array of 3: {elapsed:.2f} s")
    (array_id,) = array_ids
    # with accounting, submitit reads each task's state from sacct (without it: UNKNOWN and a warning)
    for job in jobs:
        wait_for(lambda: job.watcher.get_state(job.job_id, mode="force"), lambda s: s == "COMPLETED",
                 slurm_cluster, 120, f"submitit's state of {job.job_id}")
    assert job_states([job.job_id for job in jobs]) == {job.job_id: "COMPLETED" for job in jobs}
    assert results == [
        {
            "x": x,
            "square": x * x,
            "executor": "slurm",
            "array_job_id": array_id,
            "array_task_id": str(i),
        }
        for i, x in enumerate(xs)
    ]


@pytest.mark.slow
def test_preemption_requeues_and_resumes(slurm_cluster: Any, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    progress = tmp_path / "progress.jsonl"
    steps, hold_at = 40, 7
    task = CountWithProgress(progress, steps=steps, hold_at=hold_at)
    # 60-minute limit: a signal this early is a preemption for submitit (before min(80 %, limit - 10 min)),
    # which must not use up max_num_timeout: with 0 allowed timeouts the job is still requeued
    executor = make_executor(tmp_path / "requeue", slurm_cluster, CountWithProgress, max_num_timeout=0, timeout_min=60)
    job = executor.submit(task)
    wait_for(lambda: [r["step"] for r in read_progress(progress, "step")][-1:], lambda s: s == [hold_at],
             slurm_cluster, 300, f"job {job.job_id} holding at step {hold_at}")
    cancel([job.job_id], signal="USR2")
    wait_all([job], slurm_cluster, timeout_s=300)
    result = job.result()
    print(f"slurm preemption + requeue + resume: {time.perf_counter() - t0:.2f} s")

    starts = read_progress(progress, "start_from")
    step_numbers = [r["step"] for r in read_progress(progress, "step")]
    stderr = job.stderr() or ""
    assert result == {"steps": steps, "attempts": 2}, f"{result}\n{stderr}"
    first, second = starts
    # the same Slurm job was requeued (Slurm counts the restart), not resubmitted
    assert first["job_id"] == second["job_id"] == job.job_id
    assert (first["restart_count"], second["restart_count"]) == ("0", "1")
    # the first attempt was interrupted where it held; the second continued right after that step
    assert (first["start_from"], second["start_from"]) == (0, hold_at)
    assert step_numbers == list(range(1, steps + 1))  # no step lost, none repeated
    assert "Caught signal SIGUSR2" in stderr and "this job is preempted" in stderr, stderr
    shown = subprocess.run(
        ["scontrol", "show", "job", job.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert "Restarts=1" in shown, shown
    # accounting recorded both attempts: the requeued one and the completed one (sacct -D: duplicates too)
    attempts = wait_for(
        lambda: subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", job.job_id],
                               capture_output=True, text=True).stdout.split(),
        lambda rows: rows == [f"{job.job_id}|REQUEUED", f"{job.job_id}|COMPLETED"],
        slurm_cluster, 120, "sacct -D",
    )
    assert len(attempts) == 2

"""Real Slurm through submitit on the one-node cluster of scripts/slurm-local.sh.

(a) `map_array` submits one sbatch job array; each task runs in Slurm (its own array task id)
    and returns the right value.
(b) timeout -> USR2 -> `Checkpointable.checkpoint` -> `scontrol requeue` -> the second attempt of
    the same Slurm job resumes from the progress saved by the first one and finishes.
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
    """Counts 1..steps, one `step_s` sleep per step, appending each step to a JSON-lines file.

    A (re)start reads the file and continues after the last recorded step. `checkpoint()` resumes
    the same file with `resume_step_s` per step, so that the second attempt ends well before its own
    time limit (with 1-minute jobs the first attempt must be slow to reach the timeout signal).
    """

    def __init__(self, progress: Path, steps: int, step_s: float, resume_step_s: float) -> None:
        self.progress = Path(progress)
        self.steps = steps
        self.step_s = step_s
        self.resume_step_s = resume_step_s

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
                "time": time.time(),
            }
        )
        for step in range(done + 1, self.steps + 1):
            time.sleep(self.step_s)
            self._append({"step": step})
        return {"steps": self.steps, "attempts": len(read_progress(self.progress, "start_from"))}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        resumed = CountWithProgress(self.progress, self.steps, self.resume_step_s, self.resume_step_s)
        return submitit.helpers.DelayedSubmission(resumed, *args, **kwargs)


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


def make_executor(folder: Path, cluster: Any, fn: Any, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=cluster.partition,
        cpus_per_task=1,
        mem_gb=0.5,
        slurm_setup=cluster.job_setup(fn),
        **params,
    )
    return executor


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
    executor = make_executor(tmp_path / "array", slurm_cluster, square_in_slurm, timeout_min=2)
    assert executor.cluster == "slurm"
    xs = [3, 5, 7]
    jobs = executor.map_array(square_in_slurm, xs)
    assert len(jobs) == 3
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]  # one sbatch array, not 3 jobs
    assert [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]
    wait_all(jobs, slurm_cluster, timeout_s=90)
    results = [job.result() for job in jobs]
    elapsed = time.perf_counter() - t0
    print(f"slurm array of 3: {elapsed:.2f} s")
    (array_id,) = array_ids
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
def test_timeout_requeues_and_resumes(slurm_cluster: Any, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    progress = tmp_path / "progress.jsonl"
    steps = 80
    # 1-minute limit; slurmctld checks time limits every 30 s and sends USR2 once
    # now + delay + 30 s >= end, i.e. 15..45 s after the start with a 15 s delay: before 80 x 1 s.
    task = CountWithProgress(progress, steps=steps, step_s=1.0, resume_step_s=0.02)
    executor = make_executor(
        tmp_path / "requeue", slurm_cluster, CountWithProgress, timeout_min=1, slurm_signal_delay_s=15
    )
    job = executor.submit(task)
    wait_all([job], slurm_cluster, timeout_s=150)
    result = job.result()
    elapsed = time.perf_counter() - t0
    print(f"slurm timeout + requeue + resume: {elapsed:.2f} s")

    starts = read_progress(progress, "start_from")
    step_numbers = [r["step"] for r in read_progress(progress, "step")]
    log = job.stdout() or ""
    assert result == {"steps": steps, "attempts": 2}, f"{result}\n{log}"
    assert len(starts) == 2, starts
    first, second = starts
    # the same Slurm job was requeued (Slurm counts the restart), not resubmitted
    assert first["job_id"] == second["job_id"] == job.job_id
    assert (first["restart_count"], second["restart_count"]) == ("0", "1")
    # the first attempt was interrupted part-way; the second continued right after its last step
    assert first["start_from"] == 0
    assert 0 < second["start_from"] < steps
    assert step_numbers == list(range(1, steps + 1))  # no step lost, none repeated
    assert "Caught signal SIGUSR2" in (job.stderr() or "") + log
    shown = subprocess.run(
        ["scontrol", "show", "job", job.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert "Restarts=1" in shown, shown

"""Runs packed on one device (``resources.runs_per_gpu``), on CPU: 3 specs in one local job, each in its
own process with its own MLflow run; kill -9 of the job mid-way leaves no trainer alive; a relaunch
resumes all 3 in their runs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from study.grid import load_grid
from study.launch import launch
from study.train import checkpoint_dir

from .helpers import client_of, experiment_runs, quiet, spec_runs, write_grid
from .test_faults import checkpoint_iteration, child_pids

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_three_packed_runs_survive_a_kill_of_their_job(tmp_path, small):
    n = 30
    base = small(train={"iterations": n, "eval_interval": 15, "log_interval": 1, "checkpoint_interval": 1})
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1, 2, 3]},
                      resources={"cpus": 1, "mem_gb": 1, "timeout_min": 10, "runs_per_gpu": 3})
    runs = load_grid(path).runs
    folders = [checkpoint_dir(r.spec) for r in runs]
    killed: dict = {}

    def kill_when_all_checkpointed() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            its = [checkpoint_iteration(f) for f in folders]
            latest = tmp_path / "submitit" / "g" / "latest"
            if all(i is not None and i >= 3 for i in its) and latest.exists():
                rows = json.loads((tmp_path / "submitit" / "g" / latest.read_text().strip() / "jobs.json").read_text())
                assert len({r["job_id"] for r in rows}) == 1  # one job holds the three runs
                controller = int(rows[0]["job_id"])
                everything = _descendants(controller)
                job = child_pids(controller)  # the job process; its children are the three trainers
                for pid in job:
                    os.kill(pid, signal.SIGKILL)
                os.kill(controller, signal.SIGKILL)
                killed.update(at=its, pids=[p for p in everything if p not in job])
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_when_all_checkpointed, daemon=True)
    watcher.start()
    first = launch(path, executor="local", folder_root=tmp_path / "submitit", log=quiet)
    watcher.join(30)
    assert killed, "the job finished before it could be killed"
    assert sorted(first["failed"]) == sorted(r.hash for r in runs)
    deadline = time.time() + 60  # the kernel kills the trainers once their parent died (PR_SET_PDEATHSIG)
    while time.time() < deadline and any(_alive(p) for p in killed["pids"]):
        time.sleep(0.2)
    assert not [p for p in killed["pids"] if _alive(p)], "a trainer outlived its job"
    client = client_of(tmp_path)
    dead = {r.data.tags["study.spec_hash"]: r for r in spec_runs(experiment_runs(client))}
    assert len(dead) == 3 and all(r.info.status == "RUNNING" for r in dead.values())

    second = launch(path, executor="local", folder_root=tmp_path / "submitit", log=quiet)
    assert sorted(second["submitted"]) == sorted(r.hash for r in runs) and not second["failed"]
    done = {r.data.tags["study.spec_hash"]: r for r in spec_runs(experiment_runs(client))}
    assert len(done) == 3  # resumed in their own runs, no new ones
    for h, r in done.items():
        assert r.info.run_id == dead[h].info.run_id and r.info.status == "FINISHED"
        assert r.data.tags["study.iteration"] == str(n)


def test_a_failing_packed_run_does_not_stop_the_others(tmp_path, small):
    # batch size 1 makes the ASPP pooling's BatchNorm raise in the first step of that run only
    base = small(train={"iterations": 2, "eval_interval": 2},
                 model={"arch": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16})
    path = write_grid(tmp_path / "g.yaml", base, {"train.batch_size": [2, 1], "seed": [1]},
                      resources={"cpus": 1, "mem_gb": 1, "timeout_min": 10, "runs_per_gpu": 2})
    bad = [r.hash for r in load_grid(path).runs if r.spec.train.batch_size == 1]
    summary = launch(path, executor="local", folder_root=tmp_path / "submitit", log=quiet)
    assert summary["failed"] == bad
    states = {r.data.tags["study.spec_hash"]: r.info.status for r in spec_runs(experiment_runs(client_of(tmp_path)))}
    assert sorted(states.values()) == ["FAILED", "FINISHED"] and states[bad[0]] == "FAILED"

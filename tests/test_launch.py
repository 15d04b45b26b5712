"""Launching grids: dedup, relaunch of failed runs, local concurrency cap, many writers, real Slurm."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from study import slurm
from study.launch import default_parallelism, launch, status
from study.grid import Resources, load_grid
from study.train import checkpoint_dir


def grid_file(tmp_path, tiny, axes, name="g", resources=None, **base_sections):
    raw = {"name": name, "base": tiny(**base_sections), "axes": axes,
           "resources": resources or {"cpus": 1, "mem_gb": 1, "timeout_min": 10}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def runs_of(tmp_path, experiment="tests"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def quiet(*args, **kwargs):
    pass


def test_debug_launch_dedups_and_groups_under_parent(tmp_path, tiny):
    path = grid_file(tmp_path, tiny, {"loss": ["ce", "recall"]}, train={"iterations": 2, "eval_interval": 2})
    first = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert len(first["submitted"]) == 2 and not first["failed"]
    client, runs = runs_of(tmp_path)
    parents = [r for r in runs if "study.grid_parent" in r.data.tags]
    children = [r for r in runs if "study.spec_hash" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.data.tags["study.grid"] == "g" and r.info.status == "FINISHED" for r in children)
    again = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert again["submitted"] == [] and len(again["skipped"]) == 2
    assert len(runs_of(tmp_path)[1]) == 3  # nothing new, same parent
    rows = status(path, folder_root=tmp_path / "submitit")
    assert [r["state"] for r in rows] == ["finished", "finished"]
    assert all(r["iteration"] == 2 and r["test_miou"] is not None for r in rows)


def test_relaunch_submits_only_failed_and_missing(tmp_path, tiny):
    # batch size 1 makes BatchNorm raise in the first training step: a run that fails after it started
    path = grid_file(tmp_path, tiny, {"train.batch_size": [2, 1], "seed": [1, 2]},
                     train={"iterations": 2, "eval_interval": 2})
    first = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert len(first["submitted"]) == 4 and len(first["failed"]) == 2
    client, runs = runs_of(tmp_path)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 2 and all("Expected more than 1 value" in r.data.tags["study.failure"] for r in failed)
    rows = {r["hash"]: r["state"] for r in status(path, folder_root=tmp_path / "submitit")}
    assert sorted(rows.values()) == ["failed", "failed", "finished", "finished"]
    second = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert sorted(second["submitted"]) == sorted(first["failed"])
    # the sqlite fast path of the dedup lookup agrees with MLflow's own search
    from study import tracking

    exp_id = runs[0].info.experiment_id
    fast = tracking.find_run_states(f"sqlite:///{tmp_path}/mlflow.db", exp_id)
    slow = {h: [r.info.status for r in rs] for h, rs in
            tracking.find_runs(f"sqlite:///{tmp_path}/mlflow.db", exp_id).items()}
    assert fast == slow and len(fast) == 4 and sum(len(v) for v in fast.values()) == 6


def test_dry_run_submits_nothing(tmp_path, tiny):
    path = grid_file(tmp_path, tiny, {"seed": [1, 2, 3]})
    lines = []
    summary = launch(path, executor="local", dry_run=True, folder_root=tmp_path / "submitit", log=lines.append)
    assert len(summary["submitted"]) == 3 and sum("submit" in l for l in lines[1:]) == 3
    assert not (tmp_path / "submitit").exists()
    assert not (tmp_path / "mlflow.db").exists()  # a dry run is read-only: no store is created
    rows = status(path, folder_root=tmp_path / "submitit")  # nor does status
    assert [r["state"] for r in rows] == ["missing"] * 3 and not (tmp_path / "mlflow.db").exists()


def test_summary_has_one_row_per_axis_combination_other_than_seed(tmp_path, tiny):
    """loss x lr x seed: the report must not pool the two learning rates (one row per (loss, lr))."""
    import pandas as pd

    from analysis.report import write_report
    from study.grid import load_grid

    path = grid_file(tmp_path, tiny, {"loss": ["ce", "recall"], "train.optimizer.lr": [0.001, 0.0001],
                                      "seed": [1, 2]}, train={"iterations": 2, "eval_interval": 2})
    summary = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert len(summary["submitted"]) == 8 and not summary["failed"]
    out = tmp_path / "report"
    write_report(f"sqlite:///{tmp_path}/mlflow.db", out, grid=load_grid(path))
    table = pd.read_csv(out / "tables" / "summary.csv")
    assert len(table) == 4 and (table["n"] == 2).all()
    assert sorted(zip(table["loss"], table["train.optimizer.lr"])) == [
        ("ce", 0.0001), ("ce", 0.001), ("recall", 0.0001), ("recall", 0.001)]


def test_default_parallelism_follows_cpus_and_memory():
    cpus = os.cpu_count()
    assert default_parallelism(Resources(cpus=1, mem_gb=0.5)) == cpus
    assert default_parallelism(Resources(cpus=cpus, mem_gb=0.5)) == 1
    assert default_parallelism(Resources(cpus=1, mem_gb=10_000)) == 1


@pytest.mark.slow
def test_local_executor_respects_cap_and_logs_everything(tmp_path, tiny):
    path = grid_file(tmp_path, tiny, {"seed": [1, 2, 3]}, train={"iterations": 4, "eval_interval": 4})
    summary = launch(path, executor="local", max_parallel=2, folder_root=tmp_path / "submitit", log=quiet)
    assert not summary["failed"] and len(summary["job_ids"]) == 3
    client, runs = runs_of(tmp_path)
    children = [r for r in runs if "study.spec_hash" in r.data.tags]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    for t, _ in spans:  # at most 2 runs alive at any start time
        assert sum(s <= t < e for s, e in spans) <= 2
    # the third job could start only after one of the first two ended
    assert spans[2][0] >= min(spans[0][1], spans[1][1])
    folder = tmp_path / "submitit" / "g"
    assert (folder / "latest").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_runs_grid(slurm_cluster, tmp_path, tiny):
    path = grid_file(tmp_path, tiny, {"seed": [1, 2, 3]}, train={"iterations": 2, "eval_interval": 2},
                     resources={"cpus": 1, "mem_gb": 1, "timeout_min": 10, "partition": slurm_cluster.partition})
    summary = launch(path, executor="slurm", folder_root=tmp_path / "submitit", log=quiet)
    assert not summary["failed"], slurm_cluster.logs()
    ids = set(summary["job_ids"].values())
    assert len({i.split("_")[0] for i in ids}) == 1  # one array
    client, runs = runs_of(tmp_path)
    assert sorted(r.info.status for r in runs if "study.spec_hash" in r.data.tags) == ["FINISHED"] * 3
    assert launch(path, executor="slurm", folder_root=tmp_path / "submitit", log=quiet)["submitted"] == []


def checkpoint_iteration(folder: Path) -> int | None:
    """Iteration of the digest-checked ``last.pt`` (None while absent or being replaced)."""
    from study import checkpoint as ckpt

    try:
        return int(ckpt.load(folder / "last.pt")["iteration"])
    except (OSError, ckpt.CorruptCheckpoint, KeyError):
        return None


def wait_until(fn, want, timeout_s: float, what: str):
    """Poll ``fn()`` every 0.5 s until ``want(value)``; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    value = fn()
    while not want(value):
        assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout_s:.0f} s"
        time.sleep(0.5)
        value = fn()
    return value


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_requeues_and_continues_same_run(slurm_cluster, tmp_path, tiny):
    # the test preempts the job itself (USR2 to its step, as Slurm's --signal does) once its first checkpoint
    # exists; the 60-minute limit is never reached and max_num_timeout 0 shows preemptions do not count
    iterations, first_checkpoint = 150, 10
    path = grid_file(tmp_path, tiny, {"seed": [1]},
                     train={"iterations": iterations, "eval_interval": iterations,
                            "checkpoint_interval": first_checkpoint, "log_interval": 10},
                     resources={"cpus": 1, "mem_gb": 2, "timeout_min": 60, "partition": slurm_cluster.partition,
                                "slurm": {"max_num_timeout": 0}})
    summary = launch(path, executor="slurm", wait=False, folder_root=tmp_path / "submitit", log=quiet)
    (job_id,) = summary["job_ids"].values()
    folder = checkpoint_dir(load_grid(path).runs[0].spec)
    reached = wait_until(lambda: checkpoint_iteration(folder), lambda it: it is not None, 600,
                         f"first checkpoint of job {job_id} in {folder}")
    # 140 more iterations stand between the first checkpoint and the end: the signal meets a running job
    assert reached < iterations
    slurm.cancel([job_id], signal="USR2")
    state = wait_until(lambda: slurm.job_states([job_id]).get(job_id), lambda s: s in ENDED, 900, f"job {job_id}")
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.*"))
    assert state == "COMPLETED", (state, logs[-3000:], slurm_cluster.logs())
    assert "this job is preempted" in logs and "Exiting gracefully after preemption" in logs, logs[-3000:]
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in out, out  # requeued once, the same Slurm job

    client, runs = runs_of(tmp_path)
    children = [r for r in runs if "study.spec_hash" in r.data.tags]
    assert len(children) == 1, "the requeued job must continue the same MLflow run"
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["study.iteration"] == str(iterations)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert set(steps) == set(range(1, iterations + 1))  # steps after the checkpoint may be logged twice
    assert launch(path, executor="slurm", folder_root=tmp_path / "submitit", log=quiet)["submitted"] == []


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_packed_runs_are_preempted_together_and_both_resume(slurm_cluster, tmp_path, tiny):
    """resources.runs_per_gpu: 2 on Slurm: one job trains two runs; a preemption (USR2 to the job, sent by
    the test once both runs have a checkpoint) requeues it and both runs continue in their own MLflow runs."""
    iterations = 80
    path = grid_file(tmp_path, tiny, {"seed": [1, 2]},
                     train={"iterations": iterations, "eval_interval": iterations, "checkpoint_interval": 5,
                            "log_interval": 5},
                     resources={"cpus": 2, "mem_gb": 2, "timeout_min": 60, "partition": slurm_cluster.partition,
                                "runs_per_gpu": 2, "slurm": {"max_num_timeout": 0}})
    summary = launch(path, executor="slurm", wait=False, folder_root=tmp_path / "submitit", log=quiet)
    (job_id,) = set(summary["job_ids"].values())  # one job holds both runs
    folders = [checkpoint_dir(r.spec) for r in load_grid(path).runs]
    wait_until(lambda: [checkpoint_iteration(f) for f in folders], lambda its: all(its), 600,
               f"a checkpoint of both runs of job {job_id}")
    slurm.cancel([job_id], signal="USR2")
    state = wait_until(lambda: slurm.job_states([job_id]).get(job_id), lambda s: s in ENDED, 900, f"job {job_id}")
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.*"))
    assert state == "COMPLETED", (state, logs[-3000:], slurm_cluster.logs())
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in out, out

    client, runs = runs_of(tmp_path)
    children = [r for r in runs if "study.spec_hash" in r.data.tags]
    assert len(children) == 2, "each run must continue in its own MLflow run"
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["study.iteration"] == str(iterations)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, iterations + 1))  # each step logged exactly once
    assert launch(path, executor="slurm", folder_root=tmp_path / "submitit", log=quiet)["submitted"] == []


def test_cli_slurm_without_sbatch_is_one_clear_error(tmp_path, tiny, monkeypatch, capsys):
    from study.cli import main

    path = grid_file(tmp_path, tiny, {"seed": [1]})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["launch", str(path), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sbatch" in err and "--executor local" in err
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched

"""Faults: kill -9 of a local job and relaunch, corrupt checkpoints, failing runs inside a grid."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from study import checkpoint as ckpt
from study.data.synthia import synthia_samples
from study.data.texdigits import TexDigitsParams, ensure_texdigits
from study.grid import load_grid
from study.launch import launch
from study.spec import from_dict
from study.train import checkpoint_dir, train

from .helpers import client_of, experiment_runs, quiet, small_spec, spec_runs, steps_of, write_grid


def checkpoint_iteration(folder: Path) -> int | None:
    """Iteration of the digest-checked ``last.pt`` (None while absent or being replaced)."""
    try:
        return int(ckpt.load(folder / "last.pt")["iteration"])
    except (OSError, ckpt.CorruptCheckpoint, KeyError):
        return None


def child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_kill9_local_job_then_relaunch_resumes_same_run(tmp_path, small):
    """kill -9 of a local job mid-run; relaunch resumes its checkpoint in the same MLflow run, same test metrics"""
    n = 40
    base = small(train={"iterations": n, "eval_interval": 20, "log_interval": 1, "checkpoint_interval": 1})
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [5]})
    (run,) = load_grid(path).runs
    folder = checkpoint_dir(run.spec)

    ref_raw = copy.deepcopy(base)
    ref_raw["seed"] = 5
    ref_raw["tracking"]["experiment"] = "reference"
    reference = train(from_dict(ref_raw), progress=False)  # uninterrupted, same spec hash, other experiment

    killed: dict = {}

    def kill_when_checkpointed() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            it = checkpoint_iteration(folder)
            latest = tmp_path / "submitit" / "g" / "latest"
            if it is not None and it >= 5 and latest.exists():
                manifest = tmp_path / "submitit" / "g" / latest.read_text().strip() / "jobs.json"
                controller = int(json.loads(manifest.read_text())[0]["job_id"])  # local job id = controller pid
                trainers = child_pids(controller)
                for pid in trainers:  # the training process first, then its controller: nothing survives
                    os.kill(pid, signal.SIGKILL)
                os.kill(controller, signal.SIGKILL)
                killed.update(at=it, trainers=trainers)
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_when_checkpointed, daemon=True)
    watcher.start()
    first = launch(path, executor="local", max_parallel=1, folder_root=tmp_path / "submitit", log=quiet)
    watcher.join(30)
    assert killed and killed["trainers"], "the job finished before it could be killed"
    assert first["failed"] == [run.hash]
    k = checkpoint_iteration(folder)
    assert k is not None and 5 <= k < n
    client = client_of(tmp_path)
    (dead,) = spec_runs(experiment_runs(client))
    assert dead.info.status == "RUNNING"  # SIGKILL leaves no chance to mark anything

    second = launch(path, executor="local", max_parallel=1, folder_root=tmp_path / "submitit", log=quiet)
    assert second["submitted"] == [run.hash] and not second["failed"]
    (done,) = spec_runs(experiment_runs(client))
    assert done.info.run_id == dead.info.run_id and done.info.status == "FINISHED"
    assert done.data.tags["study.iteration"] == str(n) and "study.warning" not in done.data.tags
    history = client.get_metric_history(done.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert set(steps) == set(range(1, n + 1))
    assert all(steps.count(s) == 1 for s in range(1, k + 1)), "steps up to the checkpoint must not be re-run"
    by_step: dict[int, set] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert all(len(v) == 1 for v in by_step.values()), "a re-run step logged a different loss"
    test_metrics = {key: v for key, v in done.data.metrics.items() if key.startswith("test/")}
    assert test_metrics == reference.metrics  # bitwise equal to the uninterrupted run


def _garbage_same_size(folder: Path) -> None:
    last = folder / "last.pt"
    last.write_bytes(np.random.default_rng(0).bytes(last.stat().st_size))


def _missing_digest(folder: Path) -> None:
    (folder / "last.pt.sha256").unlink()


def _garbage_valid_digest(folder: Path) -> None:
    last = folder / "last.pt"
    data = np.random.default_rng(1).bytes(last.stat().st_size)
    last.write_bytes(data)
    (folder / "last.pt.sha256").write_text(hashlib.sha256(data).hexdigest())


class Payload:
    """Unpickling it would create the file named by ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled_object_valid_digest(folder: Path) -> None:
    last = folder / "last.pt"
    state = torch.load(last, weights_only=True)
    state["extra"] = Payload(str(folder.parent / "PWNED"))
    torch.save(state, last)
    (folder / "last.pt.sha256").write_text(hashlib.sha256(last.read_bytes()).hexdigest())


def _both_garbage(folder: Path) -> None:
    for name in ("last.pt", "last.prev.pt"):
        (folder / name).write_bytes(np.random.default_rng(2).bytes((folder / name).stat().st_size))


CORRUPTIONS = {
    "garbage bytes, same size": (_garbage_same_size, "digest mismatch"),
    "digest file missing": (_missing_digest, "no digest file"),
    "garbage bytes with a matching digest": (_garbage_valid_digest, "cannot be read"),
    "pickled object with a matching digest": (_pickled_object_valid_digest, "cannot be read"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Test metrics of the uninterrupted 6-iteration run the corrupt-checkpoint cases must reproduce."""
    raw = small_spec(tmp_path_factory.mktemp("reference"), train={"checkpoint_interval": 1})
    return train(from_dict(raw), progress=False).metrics


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, small, uninterrupted, kind):
    """corrupt last.pt not loaded: resume from last.prev.pt in the same run, warning tagged"""
    corrupt, message = CORRUPTIONS[kind]
    spec = from_dict(small(train={"checkpoint_interval": 1}))
    part = train(spec, progress=False, stop_after=3)
    folder = checkpoint_dir(spec)
    corrupt(folder)
    with pytest.warns(UserWarning, match=message):
        rest = train(spec, progress=False)
    assert not (folder.parent / "PWNED").exists()
    assert rest.resumed and rest.run_id == part.run_id and rest.iteration == 6
    client = MlflowClient(spec.tracking.uri)
    run = client.get_run(rest.run_id)
    assert run.info.status == "FINISHED" and message in run.data.tags["study.warning"]
    steps = steps_of(client, rest.run_id, "train/loss")
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # resumed from iteration 2 (last.prev.pt): step 3 re-run once
    assert rest.metrics == uninterrupted
    assert len(spec_runs(experiment_runs(client))) == 1


def test_both_checkpoints_corrupt_restart_in_new_run(tmp_path, small, uninterrupted):
    """last.pt and last.prev.pt both corrupt: restart from scratch in a NEW run; the old run is closed FAILED"""
    spec = from_dict(small(train={"checkpoint_interval": 1}))
    part = train(spec, progress=False, stop_after=3)
    _both_garbage(checkpoint_dir(spec))
    with pytest.warns(UserWarning, match="digest mismatch"):
        rest = train(spec, progress=False)
    assert not rest.resumed and rest.run_id != part.run_id and rest.iteration == 6
    client = MlflowClient(spec.tracking.uri)
    new, old = client.get_run(rest.run_id), client.get_run(part.run_id)
    assert new.info.status == "FINISHED"
    warning = new.data.tags["study.warning"]
    assert "last.pt: digest mismatch" in warning and "last.prev.pt: digest mismatch" in warning
    assert "restarted from iteration 0" in warning
    assert old.info.status == "FAILED" and rest.run_id in old.data.tags["study.failure"]
    assert steps_of(client, rest.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert rest.metrics == uninterrupted  # a restart from scratch is the same run again


def test_failing_runs_are_failed_with_reason_and_grid_finishes(tmp_path, small):
    """grid with a NaN run and an exception run (unreadable image): FAILED with reason, rest FINISHED"""
    base = small(train={"iterations": 4, "eval_interval": 4, "log_interval": 1})
    # the variant of the data whose training images are unreadable (its own texdigits folder)
    params = TexDigitsParams.from_spec({**base["data"]["texdigits"], "seed": 9})
    _, samples = synthia_samples(ensure_texdigits(Path(base["data"]["root"]), params), "manifest", 0)
    for image, _ in samples["train"]:
        Path(image).write_bytes(b"this is not a PNG")
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1, 2, 3, 4]}, overrides=[
        {"when": {"seed": 1}, "set": {"train.optimizer.lr": 1.0e+30}},  # diverges: non-finite loss
        {"when": {"seed": 2}, "set": {"data.texdigits.seed": 9}},  # raises while loading a batch
    ])
    summary = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    runs = {int(r.data.tags["study.seed"]): r for r in spec_runs(experiment_runs(client_of(tmp_path)))}
    assert sorted(runs) == [1, 2, 3, 4] and len(summary["failed"]) == 2
    assert runs[1].info.status == "FAILED"
    assert "TrainingFailed: non-finite loss" in runs[1].data.tags["study.failure"]
    assert runs[2].info.status == "FAILED"
    reason = runs[2].data.tags["study.failure"]
    assert "cannot read image file" in reason and str(Path(base["data"]["root"])) in reason
    assert runs[3].info.status == runs[4].info.status == "FINISHED"
    assert "test/miou" in runs[3].data.metrics and "test/miou" in runs[4].data.metrics


class Crash(BaseException):
    """A process death at a chosen file-system call (nothing after it runs, as with SIGKILL)."""


def test_crash_at_every_step_of_checkpoint_rotation(tmp_path, monkeypatch, record_property):
    """a crash at any file operation of a checkpoint save leaves last.pt or last.prev.pt loadable"""
    recovered = []
    for crash_at in range(12):
        folder = tmp_path / f"crash{crash_at}"
        for it in (1, 2):
            ckpt.save({"iteration": it, "w": torch.full((1000,), float(it))}, folder / "last.pt", keep_previous=True)
        calls = {"n": 0}

        def hooked(real):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at + 1:
                    raise Crash()
                return real(*args, **kwargs)
            return call

        with monkeypatch.context() as m:
            for name in ("replace", "rename", "link", "unlink", "remove"):
                m.setattr(os, name, hooked(getattr(os, name)))
            try:
                ckpt.save({"iteration": 3, "w": torch.full((1000,), 3.0)}, folder / "last.pt", keep_previous=True)
                crashed = False
            except Crash:
                crashed = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state, notes = ckpt.load_latest(folder)
        assert state is not None, f"crash before file operation {crash_at + 1}: no usable checkpoint ({notes})"
        assert state["iteration"] in (2, 3) and torch.equal(state["w"], torch.full((1000,), float(state["iteration"])))
        recovered.append(state["iteration"])
        if not crashed:
            assert state["iteration"] == 3 and not notes
            break
    record_property("detail", f"iteration recovered after a crash at file operation 1..{len(recovered)}: {recovered}")


_DIE_IN_COMMIT = """
import os, sys, json
from study import runrecord, tracking
from study.spec import from_dict
from study.train import train

raw, die_at, part = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_flush = tracking.RunLogger.flush

def commit(logger, iteration):
    if iteration == die_at:  # last.pt of this iteration is on disk; its metrics are not (all) written
        if part == "half":  # the rows are in logging order: loss 4, lr 4, loss 5, lr 5, ...
            logger._pending = logger._pending[:3]
            real_flush(logger)
        os._exit(9)
    real_flush(logger)
    logger.set_tags({"study.iteration": iteration})

runrecord.commit = commit
train(from_dict(raw), progress=False)
"""


@pytest.mark.parametrize("part", ["none", "half"])
def test_death_between_checkpoint_and_metric_write_logs_every_step_once(tmp_path, small, part):
    """The process dies after last.pt of iteration 6 is saved and before (or half-way through) writing
    that checkpoint's metrics: the resumed run completes the write; every step 1..n is logged once."""
    import subprocess
    import sys

    n, die_at = 12, 6
    raw = small(train={"iterations": n, "eval_interval": 6, "log_interval": 1, "checkpoint_interval": 3})
    raw["seed"] = 3
    proc = subprocess.run([sys.executable, "-c", _DIE_IN_COMMIT, json.dumps(raw), str(die_at), part],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    spec = from_dict(copy.deepcopy(raw))
    assert checkpoint_iteration(checkpoint_dir(spec)) == die_at
    client = client_of(tmp_path)
    (dead,) = spec_runs(experiment_runs(client))
    loss_before, lr_before = (steps_of(client, dead.info.run_id, k) for k in ("train/loss", "train/lr"))
    if part == "none":
        assert loss_before == lr_before == [1, 2, 3]
    else:  # the write was cut after three rows
        assert (loss_before, lr_before) == ([1, 2, 3, 4, 5], [1, 2, 3, 4])
    assert dead.data.tags["study.iteration"] == "3"

    result = train(spec, progress=False)
    assert result.run_id == dead.info.run_id and result.resumed
    for key in ("train/loss", "train/lr"):
        assert steps_of(client, result.run_id, key) == list(range(1, n + 1)), key
    assert steps_of(client, result.run_id, "val/miou") == [6, 12]

"""Operating a grid: claims (no run trained twice), liveness in `study status`, `study cancel`, and
Ctrl-C / SIGTERM on a waiting `study launch`. Real MLflow sqlite stores, real submitit local jobs, real
signals; every wait polls for the event itself (a claim taken, a process gone), never the clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study import claim as claims
from study.cancel import cancel
from study.cli import main
from study.grid import load_grid
from study.launch import launch
from study.plan import run_folder
from study.status import status
from tests.reliability.helpers import python_env, quiet, small_spec, write_grid

POLL_LIMIT_S = 600  # generous bound on waiting for an event on a loaded machine; never an assertion


def spec_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tests")
    return [r for r in client.search_runs([exp.experiment_id]) if "study.spec_hash" in r.data.tags]


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + POLL_LIMIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


HOLDER = """
import sys
from study import claim
c = claim.take(sys.argv[1])
print("held" if c else "busy", flush=True)
sys.stdin.read()
"""


def test_run_held_by_a_live_process_is_not_trained(tmp_path, capsys):
    """a run whose claim another live process holds is neither submitted nor trained; released, it trains"""
    base = small_spec(tmp_path, train={"iterations": 2, "eval_interval": 2, "log_interval": 1})
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1, 2]})
    grid = load_grid(path)
    held_run = grid.runs[0]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_folder(held_run))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=python_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        summary = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
        assert list(summary["held"]) == [held_run.hash] and f"pid {holder.pid}" in summary["held"][held_run.hash]
        assert summary["submitted"] == [grid.runs[1].hash] and not summary["failed"]
        assert [r.data.tags["study.spec_hash"] for r in spec_runs(tmp_path)] == [grid.runs[1].hash]
        # `study run` of the held spec says so and exits 0 without training
        spec_file = tmp_path / "held.yaml"
        import yaml

        spec_file.write_text(yaml.safe_dump({**base, "seed": 1}))
        assert main(["run", str(spec_file)]) == 0
        out = capsys.readouterr().out
        assert f"is held by live (pid {holder.pid}" in out, out
        assert len(spec_runs(tmp_path)) == 1
    finally:
        holder.stdin.close()
        holder.wait(60)
    again = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert again["submitted"] == [held_run.hash] and not again["held"] and not again["failed"]
    runs = spec_runs(tmp_path)
    assert sorted(r.data.tags["study.spec_hash"] for r in runs) == sorted(r.hash for r in grid.runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    # a finished spec: `study run` says so, trains nothing
    assert main(["run", str(spec_file)]) == 0
    assert "is already finished" in capsys.readouterr().out and len(spec_runs(tmp_path)) == 2


@pytest.mark.slow
def test_two_launches_at_once_train_each_run_once(tmp_path):
    """two `study launch` of one grid at once: one FINISHED run per hash, the other launcher stands down"""
    base = small_spec(tmp_path, train={"iterations": 4, "eval_interval": 4, "log_interval": 2})
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1, 2]})
    hashes = [r.hash for r in load_grid(path).runs]
    from study.tracking import prepare

    prepare(f"sqlite:///{tmp_path}/mlflow.db", "tests")  # a new sqlite store is created by one process first
    cmd = [sys.executable, "-m", "study", "launch", str(path), "--executor", "local", "--max-parallel", "2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path / sub, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=python_env()) for sub in (".", ".")]
    outs = [p.communicate(timeout=POLL_LIMIT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = spec_runs(tmp_path)
    assert sorted(r.data.tags["study.spec_hash"] for r in runs) == sorted(hashes), outs  # one run per hash
    assert all(r.info.status == "FINISHED" for r in runs)
    text = "\n".join(outs)
    for h in hashes:
        trained = [ln for ln in text.splitlines() if ln.strip().startswith(f"finished {h}")]
        assert len(trained) == 1, text
        stood_down = [ln for ln in text.splitlines() if h in ln and ("held by live" in ln or "already finished" in ln)]
        assert stood_down or "skipped 2 finished" in text or "1 finished (skipped)" in text, text


def test_status_tells_stale_from_running_and_shows_full_reasons(tmp_path):
    """status: RUNNING with no live claim is stale; a live claim is running; a failure reason is shown whole"""
    base = small_spec(tmp_path)
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1, 2, 3, 4]})
    grid = load_grid(path)
    from study.tracking import prepare

    uri, exp_id = prepare(f"sqlite:///{tmp_path}/mlflow.db", "tests")
    client = MlflowClient(uri)
    old = int(time.time()) - 25 * 60
    reason = "ValueError: " + "x" * 300
    for run, tags, end in ((grid.runs[0], {"study.heartbeat": old}, None),
                           (grid.runs[1], {"study.heartbeat": int(time.time())}, None),
                           (grid.runs[2], {"study.failure": reason}, "FAILED")):
        r = client.create_run(exp_id, tags={"study.spec_hash": run.hash, **{k: str(v) for k, v in tags.items()}})
        if end:
            client.set_terminated(r.info.run_id, end)
    claims.take(run_folder(grid.runs[0])).release()  # a claim file nobody holds: the job died
    live = claims.take(run_folder(grid.runs[1]))
    try:
        rows = {r["hash"]: r for r in status(path, folder_root=tmp_path / "submitit")}
    finally:
        live.release()
    assert rows[grid.runs[0].hash]["status"] == "stale (no heartbeat for 25 min)"
    assert rows[grid.runs[1].hash]["status"] == "running"
    assert rows[grid.runs[2].hash]["status"] == f"failed: {reason}"
    assert rows[grid.runs[3].hash]["status"] == "missing"
    assert not (tmp_path / "submitit").exists()  # status wrote nothing


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_on_waiting_launch_then_status_and_cancel(tmp_path, sig):
    """Ctrl-C / SIGTERM on a waiting `study launch`: it says how to follow/cancel and exits; the job lives
    on (status: running, with its job id) until `study cancel`, which closes its run KILLED with a reason"""
    base = small_spec(tmp_path, train={"iterations": 10**6, "eval_interval": 10**6, "log_interval": 10})
    path = write_grid(tmp_path / "g.yaml", base, {"seed": [1]})
    folder = run_folder(load_grid(path).runs[0])
    # files, not pipes: the job inherits the launcher's output and keeps a pipe open after it exits
    with open(tmp_path / "out.txt", "w") as out_file, open(tmp_path / "err.txt", "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "study", "launch", str(path), "--executor", "local"],
                                cwd=tmp_path, stdout=out_file, stderr=err_file, text=True, env=python_env(),
                                start_new_session=True)
    try:
        record = wait_for(lambda: claims.holder(folder) and claims.holder(folder).get("run_id")
                          and claims.holder(folder), "the job to claim its run", proc)
        if sig == signal.SIGINT:  # as a terminal's Ctrl-C: to the launcher's whole process group
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=POLL_LIMIT_S)
        out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
        assert proc.returncode == 128 + sig, (out, err)
        assert "Traceback" not in err and f"study cancel {path}" in err and f"study status {path}" in err, err
        assert claims.holder(folder) is not None  # the job trains on
        beat = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(record["run_id"]).data.tags["study.heartbeat"]
        assert int(beat) >= record["since"]  # stamped when the run was opened (then every 30 s at log flushes)
        (row,) = status(path, folder_root=tmp_path / "submitit")
        assert row["status"] == "running" and row["job"] and row["job"] == record["job_id"], row
        done = cancel(path, folder_root=tmp_path / "submitit", log=quiet)
        assert claims.holder(folder) is None
        (run,) = spec_runs(tmp_path)
        assert done["closed"] == [run.info.run_id] == [record["run_id"]]
        assert run.info.status == "KILLED" and "cancelled by `study cancel`" in run.data.tags["study.cancelled"]
        (row,) = status(path, folder_root=tmp_path / "submitit")
        assert row["status"].startswith("failed: cancelled by `study cancel`"), row
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = claims.holder(folder)
        if left and left.get("pid"):
            os.kill(int(left["pid"]), signal.SIGKILL)

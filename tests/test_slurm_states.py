"""study.slurm: job states (squeue, then sacct) and scancel, on the real one-node cluster of
scripts/slurm-local.sh; without Slurm's commands, an empty answer or one SlurmError, never a traceback.

Every job here waits for a file the test creates (or a signal the test sends): no test depends on how
fast the machine is, only on generous deadlines for things that must eventually happen.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from study import slurm


def poll(fn, want, timeout_s: float = 180.0, what: str = ""):
    """Call ``fn()`` every 0.5 s until ``want(value)``; fail with the last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    value = fn()
    while not want(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what or fn} still {value!r} after {timeout_s:.0f} s")
        time.sleep(0.5)
        value = fn()
    return value


# ---- without Slurm: parsing and refusal -------------------------------------------------------------------

def test_row_ids_expand_pending_array_records():
    assert slurm.row_job_ids("123") == ["123"]
    assert slurm.row_job_ids("123_4") == ["123_4"]
    assert slurm.row_job_ids("123_[1-3,7]") == ["123_1", "123_2", "123_3", "123_7"]
    assert slurm.row_job_ids("123_[5-6%1]") == ["123_5", "123_6"]
    assert slurm.row_job_ids("123+0") == ["123+0"]


def test_parse_states_first_word_and_ranges():
    text = "7|RUNNING\n8|CANCELLED by 0\n9_[2-3%1]|PENDING\n9_0|COMPLETED\n\nbroken line\n"
    assert slurm.parse_states(text) == {"7": "RUNNING", "8": "CANCELLED", "9_2": "PENDING", "9_3": "PENDING",
                                        "9_0": "COMPLETED"}


@pytest.mark.parametrize("bad", ["abc", "12_", "_3", "1.2", "12 13", "12_[1-2]", ""])
def test_bad_job_id_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=re.escape(f"job id {bad!r} is not allowed")):
        slurm.job_states(["5", bad])
    with pytest.raises(ValueError, match="is not allowed"):
        slurm.cancel([bad])


@pytest.mark.parametrize("given, name", [("USR2", "USR2"), ("sigusr2", "USR2"), (12, "USR2"), ("TERM", "TERM")])
def test_signal_names(given, name):
    assert slurm.signal_name(given) == name


def test_unknown_signal_is_a_value_error():
    with pytest.raises(ValueError, match="signal: 'FOO' is not allowed"):
        slurm.cancel(["5"], signal="FOO")


def test_without_slurm_states_are_empty_and_cancel_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no squeue, sacct or scancel
    assert slurm.job_states(["5", "6_1"]) == {}
    assert slurm.job_states([]) == {}
    with pytest.raises(slurm.SlurmError, match="scancel is not on PATH"):
        slurm.cancel(["5"])
    slurm.cancel([])  # nothing to cancel: no command needed


# ---- on the real cluster -------------------------------------------------------------------------------------

def sbatch(tmp_path: Path, script: str, *args: str) -> str:
    """Submit ``script`` (bash) with sbatch; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-c", "1", "--mem=100M",
                          "-o", str(tmp_path / "slurm-%A_%a.out"), *args, "--wrap", script],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def wait_for_file(path: Path) -> str:
    return f"while [ ! -e {path} ]; do sleep 0.2; done"


@pytest.mark.slurm
def test_states_of_a_job_through_its_life(slurm_cluster, tmp_path):
    go = tmp_path / "go"
    job = sbatch(tmp_path, wait_for_file(go))
    poll(lambda: slurm.job_states([job]), lambda s: s == {job: "RUNNING"}, what=f"job {job}")
    go.touch()
    assert poll(lambda: slurm.job_states([job]), lambda s: s.get(job) == "COMPLETED") == {job: "COMPLETED"}
    # the accounting database has it too (sacct works: slurmdbd and MariaDB are up)
    poll(lambda: slurm.accounting_states([job]), lambda s: s == {job: "COMPLETED"}, what=f"sacct of {job}")
    assert slurm.job_states([job, "999999"]) == {job: "COMPLETED"}  # an unknown id is simply absent
    assert slurm.queue_states(["999999"]) == {}  # squeue exits 1 for a lone unknown id: no error


@pytest.mark.slurm
def test_array_tasks_and_cancel_of_one_task(slurm_cluster, tmp_path):
    go = tmp_path / "go"
    array = sbatch(tmp_path, wait_for_file(go), "--array=0-3%1")  # one task at a time: 1..3 wait in one record
    tasks = [f"{array}_{i}" for i in range(4)]
    states = poll(lambda: slurm.job_states(tasks), lambda s: s.get(tasks[0]) == "RUNNING", what="task 0")
    assert states == {tasks[0]: "RUNNING", tasks[1]: "PENDING", tasks[2]: "PENDING", tasks[3]: "PENDING"}
    # a running task is cancelled alone; the next task starts (a task cancelled while still inside the pending
    # record 123_[1-3] leaves no record of its own in squeue or sacct with Slurm 22.05, so none is tried here)
    slurm.cancel([tasks[0]])
    poll(lambda: slurm.job_states(tasks[:2]), lambda s: s == {tasks[0]: "CANCELLED", tasks[1]: "RUNNING"},
         what="tasks 0 and 1")
    go.touch()
    final = poll(lambda: slurm.job_states(tasks), lambda s: s.get(tasks[3]) == "COMPLETED", what="the array")
    assert final == {tasks[0]: "CANCELLED", tasks[1]: "COMPLETED", tasks[2]: "COMPLETED", tasks[3]: "COMPLETED"}
    slurm.cancel(tasks)  # all ended: cancelling again is no error


@pytest.mark.slurm
def test_cancel_with_signal_reaches_the_job_step(slurm_cluster, tmp_path):
    got, ready = tmp_path / "got-usr2", tmp_path / "trap-set"
    # the signal goes to job steps (srun), as Slurm's --signal at a time limit does, not to the batch shell;
    # the step says when its trap is set, so the signal is sent only once it can be caught
    step = f"trap 'touch {got}; exit 0' USR2; touch {ready}; while :; do sleep 0.2; done"
    job = sbatch(tmp_path, f"srun bash -c \"{step}\"")
    poll(ready.exists, bool, what=f"{ready}")
    assert slurm.job_states([job]) == {job: "RUNNING"}
    slurm.cancel([job], signal="USR2")
    poll(got.exists, bool, what=f"{got}")
    assert poll(lambda: slurm.job_states([job]), lambda s: s.get(job) == "COMPLETED") == {job: "COMPLETED"}


@pytest.mark.slurm
def test_accounting_absent_falls_back_to_squeue(slurm_cluster, tmp_path, monkeypatch):
    conf = slurm_cluster.conf.read_text()
    no_accounting = tmp_path / "slurm.conf"  # the same cluster, seen by clients that have no accounting
    no_accounting.write_text(conf.replace("AccountingStorageType=accounting_storage/slurmdbd",
                                          "AccountingStorageType=accounting_storage/none"))
    go = tmp_path / "go"
    job = sbatch(tmp_path, wait_for_file(go))
    poll(lambda: slurm.job_states([job]), lambda s: s == {job: "RUNNING"}, what=f"job {job}")
    monkeypatch.setenv("SLURM_CONF", str(no_accounting))
    sacct = subprocess.run(["sacct", "-X", "-n", "-j", job], capture_output=True, text=True)
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr, sacct
    assert slurm.accounting_states([job]) == {}
    assert slurm.job_states([job]) == {job: "RUNNING"}
    slurm.cancel([job])
    poll(lambda: slurm.job_states([job]), lambda s: s == {job: "CANCELLED"}, what=f"job {job}")

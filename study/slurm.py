"""Slurm job states and cancellation through Slurm's own commands (squeue, sacct, scancel).

Job ids are the ones submitit reports: ``"123"`` for a plain job, ``"123_4"`` for task 4 of array job 123.
Each function runs one command per list of ids (``job_states`` at most two: squeue, then sacct for the ids
squeue no longer knows), never one per job. Without Slurm's commands ``job_states`` returns ``{}``
and ``cancel`` raises ``SlurmError``; neither lets a subprocess exception escape.

Why squeue first: the controller's queue is live, while the accounting database (sacct) is fed
asynchronously by slurmctld, so a job submitted or cancelled a moment ago may be missing there, or an
array task still shown inside its pending ``123_[1-3]`` record. sacct answers for jobs the controller has
already forgotten (``MinJobAge`` after they end), which is the part squeue cannot give.
"""

from __future__ import annotations

import re
import shutil
import signal as signals
import subprocess

COMMAND_TIMEOUT_S = 60
JOB_ID = re.compile(r"\d+(_\d+)?")
# one row of squeue/sacct: 123, 123_4, or a pending array record 123_[1-3,7%2]
ROW_ID = re.compile(r"(?P<job>\d+)(?:_(?:(?P<task>\d+)|\[(?P<ranges>[0-9,\-]+)(?:%\d+)?\]))?")


class SlurmError(RuntimeError):
    """A Slurm command is missing or refused the request (the message says which and why)."""


def check_job_ids(job_ids: list[str]) -> list[str]:
    """The ids as strings; ValueError naming the first one that is not ``N`` or ``N_M``."""
    ids = [str(j) for j in job_ids]
    for job_id in ids:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} is not allowed (allowed: a Slurm job id such as 123, "
                             "or 123_4 for task 4 of array job 123)")
    return ids


def row_job_ids(row_id: str) -> list[str]:
    """The job ids one squeue/sacct row stands for: ``123_[1-3,7%2]`` -> 123_1, 123_2, 123_3, 123_7."""
    match = ROW_ID.fullmatch(row_id)
    if match is None:
        return [row_id]  # heterogeneous job components (123+0) and the like: kept verbatim
    if match["ranges"] is None:
        return [row_id]
    ids = []
    for part in match["ranges"].split(","):
        first, _, last = part.partition("-")
        ids += [f"{match['job']}_{task}" for task in range(int(first), int(last or first) + 1)]
    return ids


def parse_states(output: str) -> dict[str, str]:
    """``JOBID|STATE`` lines -> {job id: state}; ``CANCELLED by 0`` is read as ``CANCELLED``."""
    states = {}
    for line in output.splitlines():
        row_id, sep, state = line.strip().partition("|")
        if not sep or not state.strip():
            continue
        for job_id in row_job_ids(row_id.strip()):
            states[job_id] = state.split()[0]
    return states


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    """Run a Slurm command; None when it is not installed, hangs or cannot be started."""
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """States of the jobs slurmctld still holds (running, pending, or ended less than MinJobAge ago).

    One ``squeue -h -t all -o %i|%T -j IDS`` call; {} when squeue is absent or the controller does not
    answer. squeue exits 1 when the only id asked for is unknown: that is an empty answer, not an error.
    """
    return _states_from(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j"], job_ids)


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """States recorded by Slurm's accounting (slurmdbd): the latest attempt of each job.

    One ``sacct -X -n -P -o JobID,State -j IDS`` call (-X: the allocation, not its steps; without -D
    a requeued job shows its last attempt). {} when sacct is absent or accounting is disabled.
    """
    return _states_from(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j"], job_ids)


def _states_from(command: list[str], job_ids: list[str]) -> dict[str, str]:
    """``command`` + the comma-joined ids, its ``id|STATE`` lines parsed; {} when it cannot answer."""
    ids = check_job_ids(job_ids)
    if not ids:
        return {}
    done = _run([*command, ",".join(ids)])
    if done is None or done.returncode != 0:
        return {}
    found = parse_states(done.stdout)
    return {j: found[j] for j in ids if j in found}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``CANCELLED``, ``REQUEUED``, ...) per job id.

    squeue answers for the jobs the controller holds; sacct, asked only about the rest, for jobs it has
    forgotten. Ids neither knows are absent from the result; {} when Slurm's commands are absent.
    """
    ids = check_job_ids(job_ids)
    states = queue_states(ids)
    missing = [j for j in ids if j not in states]
    if missing:
        states.update(accounting_states(missing))
    return {j: states[j] for j in ids if j in states}


def signal_name(sig: str | int) -> str:
    """``"USR2"``, ``"SIGUSR2"``, ``signal.SIGUSR2`` or ``12`` -> ``"USR2"`` (scancel's spelling)."""
    try:
        if isinstance(sig, int):
            return signals.Signals(sig).name.removeprefix("SIG")
        name = sig.strip().upper().removeprefix("SIG")
        return signals.Signals["SIG" + name].name.removeprefix("SIG")
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"signal: {sig!r} is not allowed (allowed: a signal name such as USR2 or TERM, "
                         "or its number)") from None


def cancel(job_ids: list[str], signal: str | int | None = None) -> None:
    """Cancel the jobs (``scancel IDS``), or send them a signal (``scancel --signal=SIG IDS``).

    A signal goes to the jobs' steps, not to the batch shell: that is what Slurm's ``--signal`` at a time
    limit does, and what submitit's Checkpointable jobs handle (USR2: checkpoint, then requeue; a signal
    that arrives before min(80 % of the time limit, the limit less 10 min) counts as a preemption, which does
    not use up submitit's max_num_timeout). Jobs already ended are no error.
    One scancel call for the whole list; SlurmError when scancel is absent or fails.
    """
    ids = check_job_ids(job_ids)
    command = ["scancel"] + ([f"--signal={signal_name(signal)}"] if signal is not None else [])
    if not ids:
        return
    if shutil.which("scancel") is None:
        raise SlurmError("scancel is not on PATH: Slurm's client commands are needed to cancel Slurm jobs")
    try:
        done = subprocess.run(command + ids, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        raise SlurmError(f"scancel {' '.join(ids)}: {err}") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"scancel {' '.join(ids)} failed (exit {done.returncode}): "
                         f"{reason[-1] if reason else 'no message'}")

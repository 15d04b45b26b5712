"""Claims: one live job per run, held as an exclusive lock next to the run's checkpoints.

A job claims its run before it trains by taking ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``{checkpoint_root}/{experiment}/{spec_hash}/.claim`` and keeps the file open (the lock) for its
lifetime; the file names the holder (host, pid, executor job id, MLflow run id). The kernel drops the
lock when the process ends, however it ends (``kill -9`` included), so a claim can never outlive its
job and never needs cleaning up. A second job, launcher or ``study run`` finds the lock taken and
stands down. Readers (``study status``, ``study cancel``) open the file read-only and test the lock with
a shared non-blocking ``flock``, which they drop at once; they never create the file.

flock is per open file description: two jobs in one process conflict exactly as two processes do.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

CLAIM_FILE = ".claim"
TAKE_ATTEMPTS = 10


def claim_path(folder: Path) -> Path:
    return Path(folder) / CLAIM_FILE


def job_id_from_env() -> str:
    """The executor's id of the job this process runs in ('' outside submitit/Slurm)."""
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(name):
            if name == "SLURM_ARRAY_JOB_ID" and os.environ.get("SLURM_ARRAY_TASK_ID"):
                return f"{os.environ[name]}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            return os.environ[name]
    return ""


class Claim:
    """A held claim; :meth:`note` rewrites the holder record, :meth:`release` (or exit) drops it."""

    def __init__(self, path: Path, fd: int, record: dict):
        self.path, self.fd, self.record = path, fd, record

    def note(self, **fields) -> None:
        self.record.update(fields)
        data = json.dumps(self.record, sort_keys=True).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take(folder: Path, **fields) -> Claim | None:
    """Claim the run whose checkpoints live in ``folder``; None if a live job holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = claim_path(folder)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(TAKE_ATTEMPTS):  # a reader's shared test lock lasts microseconds: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == TAKE_ATTEMPTS - 1:
                os.close(fd)
                return None
            time.sleep(0.05)
    claim = Claim(path, fd, {})
    claim.note(host=socket.gethostname(), pid=os.getpid(), job_id=job_id_from_env(), since=int(time.time()),
               **fields)
    return claim


def holder(folder: Path) -> dict | None:
    """The record of the live job holding the claim, or None if nobody holds it (read-only)."""
    path = claim_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_record(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_record(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(record: dict) -> str:
    """``job 123 (pid 456 on host)`` for messages."""
    job = f"job {record['job_id']} " if record.get("job_id") else ""
    return f"{job}(pid {record.get('pid', '?')} on {record.get('host', '?')})"

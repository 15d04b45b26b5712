"""`python -m tests.reliability [--report] [--fast] [pytest args]`: run the reliability suite with pytest.

Runs tests/reliability, tests/test_launch_claims.py (claims, status, cancel, signals) plus the Slurm
preemption/requeue case of tests/test_launch.py; ``--report`` prints a
table of every case tried and its outcome afterwards; ``--fast`` leaves out the cases marked slow.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.report import Report

REPO = Path(__file__).resolve().parents[2]
SELECTION = ["tests/reliability", "tests/test_launch_claims.py",
             "tests/test_launch.py::test_slurm_preemption_requeues_and_continues_same_run"]


def main(argv: list[str]) -> int:
    report = "--report" in argv
    fast = "--fast" in argv
    extra = [a for a in argv if a not in ("--report", "--fast")]
    os.chdir(REPO)
    args = [*SELECTION, "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *extra]
    if fast:
        args += ["-m", "not slow"]
    plugin = Report()
    start = time.perf_counter()
    code = pytest.main(args, plugins=[plugin])
    if report:
        print()
        print(f"reliability suite: {time.perf_counter() - start:.0f} s wall, pytest exit code {int(code)}")
        print(plugin.table())
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m benchmarks.cli_speed``: wall time of `study --help` and of `study status` on a 24-run grid.

Targets (issue 15): `study --help` <= 0.5 s, `study status` of a 24-run grid <= 2 s, neither importing
torch. Each command is a fresh process (what a user waits for), timed ``REPEATS`` times; the median is
printed beside the median of a bare ``python -c pass`` (interpreter start-up) on the same machine at
the same moment, so a loaded machine shows as a higher baseline, not as a slower command.

The grid is launched-like: its expansion is cached as `study launch` caches it, and the store holds
one run per spec (12 finished, 12 failed) in a real sqlite MLflow store.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPEATS = 5
REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def launched_grid(root: Path) -> Path:
    """A 24-run grid (4 losses x 6 seeds) with its expansion cached and one run per spec in the store."""
    from mlflow.tracking import MlflowClient

    from study.grid import load_grid
    from study.status import write_cache
    from study.tracking import prepare
    from tests.conftest import tiny_spec

    path = root / "g24.yaml"
    path.write_text(yaml.safe_dump({"name": "g24", "base": tiny_spec(root),
                                    "axes": {"loss": ["ce", "recall", "focal", "dice"], "seed": list(range(6))}}))
    grid = load_grid(path)
    uri, exp_id = prepare(f"sqlite:///{root}/mlflow.db", "tests")
    client = MlflowClient(uri)
    for i, run in enumerate(grid.runs):
        r = client.create_run(exp_id, tags={"study.spec_hash": run.hash, "study.iteration": "6"})
        client.log_metric(r.info.run_id, "test/miou", 0.1 * (i % 7), step=6)
        client.set_terminated(r.info.run_id, "FINISHED" if i % 2 == 0 else "FAILED")
    write_cache(grid, root / "submitit")
    return path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grid = launched_grid(root)
        base = timed([sys.executable, "-c", "pass"], root)
        rows = [("python -c pass (baseline)", base, None),
                ("study --help", timed([sys.executable, "-m", "study", "--help"], root), 0.5),
                ("study status (24 runs)", timed([sys.executable, "-m", "study", "status", str(grid)], root), 2.0)]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {REPEATS}")
    for name, seconds, target in rows:
        met = "" if target is None else f"  target <= {target} s: {'yes' if seconds <= target else 'NO'}"
        print(f"{name:28s} {seconds:6.3f} s  ({seconds / base:4.1f}x baseline){met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

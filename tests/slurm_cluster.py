"""Session fixture `slurm_cluster`: a real one-node Slurm cluster (with sacct accounting through slurmdbd and
a private MariaDB) started by scripts/slurm-local.sh.

Import it from tests/conftest.py (`from tests.slurm_cluster import slurm_cluster  # noqa: F401`).
The cluster runs as root with all its state in a pytest temp dir; `SLURM_CONF` is set in
`os.environ` for the whole session (sbatch/squeue/scontrol and submitit read it) and restored at
teardown. Without the Debian binaries or without root the fixture skips, naming what is missing.

Jobs submitted by submitit run `sys.executable -m submitit.core._submit` with the submitter's
environment and working directory; functions pickled by reference from test modules must be
importable there, so use `SlurmCluster.job_setup(fn)` (exports PYTHONPATH) as `slurm_setup`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm-local.sh"
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch", "srun",
                     "squeue", "scontrol", "scancel", "sinfo", "sacct", "sacctmgr")
# AF_UNIX socket paths are limited to 107 bytes; the munge socket lives in the state dir.
_MAX_STATE_DIR_LEN = 80


def missing_requirements() -> list[str]:
    """Reasons the cluster cannot start here (empty list when it can)."""
    reasons = []
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        reasons.append(
            f"Slurm/munge binaries not on PATH: {', '.join(missing)} "
            "(install Debian's slurmctld slurmd slurmdbd slurm-client munge mariadb-server: scripts/ci-apt.sh)"
        )
    if os.geteuid() != 0:
        reasons.append(f"a local Slurm cluster needs root (uid is {os.geteuid()})")
    if not SCRIPT.is_file():
        reasons.append(f"missing {SCRIPT}")
    return reasons


def import_root(obj: Any) -> Path:
    """The sys.path entry from which `obj`'s module was imported (what a job needs on PYTHONPATH).

    `tests.test_x` from /repo/tests/test_x.py -> /repo; `test_x` (pytest rootdir-less import) -> /repo/tests.
    """
    module = sys.modules[obj.__module__]
    path = Path(module.__file__).resolve()
    depth = len(module.__name__.split("."))
    if path.name == "__init__.py":
        depth += 1
    return path.parents[depth - 1]


@dataclass
class SlurmCluster:
    """A running one-node cluster: its slurm.conf, state dir and default partition."""

    state_dir: Path
    conf: Path
    partition: str = "debug"
    start_s: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def job_setup(self, *objs: Any) -> list[str]:
        """`slurm_setup` lines making the modules of `objs` (and the repo) importable in a job."""
        roots = [str(REPO_ROOT)] + [str(import_root(o)) for o in objs]
        unique = list(dict.fromkeys(roots))
        return [f"export PYTHONPATH={':'.join(unique)}${{PYTHONPATH:+:$PYTHONPATH}}"]

    def logs(self, lines: int = 40) -> str:
        """Tail of every daemon log, for assertion messages."""
        out = []
        for f in sorted((self.state_dir / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {f} -----\n" + "\n".join(text))
        return "\n".join(out)

    def squeue(self) -> str:
        return subprocess.run(
            ["squeue", "-o", "%i %T %r %M %l"], capture_output=True, text=True, env=os.environ | self.env
        ).stdout


def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slurm")
    if len(str(path)) > _MAX_STATE_DIR_LEN:  # keep the munge socket path short enough
        path = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    return path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reasons = missing_requirements()
    if reasons:
        pytest.skip("no local Slurm cluster: " + "; ".join(reasons))
    state_dir = _state_dir(tmp_path_factory)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state_dir)], capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/slurm-local.sh start failed (rc {proc.returncode}):\n{proc.stderr}\n{proc.stdout}",
            pytrace=False,
        )
    env = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            env[key] = value
    cluster = SlurmCluster(
        state_dir=state_dir, conf=Path(env["SLURM_CONF"]), start_s=time.perf_counter() - t0, env=env
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop = subprocess.run(
            ["bash", str(SCRIPT), "stop", str(state_dir)], capture_output=True, text=True, timeout=120
        )
        if stop.returncode != 0:
            print(f"scripts/slurm-local.sh stop failed (rc {stop.returncode}):\n{stop.stderr}", file=sys.stderr)

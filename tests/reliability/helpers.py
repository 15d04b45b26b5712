"""Helpers of the reliability suite: small specs, grid files, store checks, a real MLflow server."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_spec

REPO = Path(__file__).resolve().parents[2]


def small_spec(tmp_path: Path, **sections) -> dict:
    """tests/conftest.py's tiny spec on the cheapest network (LR-ASPP MobileNetV3-small, ~0.05 s a step)."""
    raw = tiny_spec(tmp_path, **sections)
    if "model" not in sections:
        raw["model"] = {"arch": "lraspp", "backbone": "mobilenet_v3_small"}
    return raw


def write_grid(path: Path, base: dict, axes: dict, name: str = "g", **extra) -> Path:
    raw = {"name": name, "base": copy.deepcopy(base), "axes": axes,
           "resources": {"cpus": 1, "mem_gb": 1, "timeout_min": 10}, **extra}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def quiet(*args, **kwargs) -> None:
    pass


def client_of(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def experiment_runs(client: MlflowClient, name: str = "tests") -> list:
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=5000)


def spec_runs(runs: list) -> list:
    return [r for r in runs if "study.spec_hash" in r.data.tags]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` as study/cli.py starts it (server_command), in its own process group."""

    def __init__(self, store_uri: str, port: int, log: Path):
        from study.cli import server_command

        self.cmd, self.env = server_command(store_uri, "127.0.0.1", port)
        self.port, self.log, self.proc = port, log, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        out = open(self.log, "a")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the group we created for it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


def python_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                MLFLOW_DISABLE_TELEMETRY="true")

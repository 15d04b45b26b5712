"""`study ui` / `study server`: the server command line, the UI address, and `study ui` end to end.

Also holds the helpers that start a real `mlflow server` for tests (used by tests/test_ui_browser.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from study.cli import server_command, ui_url
from study.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, prepare

READY_TIMEOUT_S = 90.0  # ~8 s on an idle machine; CI machines are shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> float:
    """Poll ``/health`` until the server answers OK; fail with the server's log if it dies or hangs."""
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            if get(f"{base}/health", timeout=2.0) == (200, b"OK"):
                return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"server not healthy after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def mlflow_server(uri: str, log: Path) -> Iterator[tuple[str, int]]:
    """A real `mlflow server` on ``uri`` started with the project's command line; yields (host, port)."""
    host, port = "127.0.0.1", free_port()
    cmd, env = server_command(uri, host, port)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = wait_healthy(f"http://{host}:{port}", proc, log)
        print(f"mlflow server ready in {ready:.1f} s on port {port}")
        yield host, port
    finally:
        stop(proc)


def test_server_command_serves_the_store_beside_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd, env = server_command("sqlite:///mlflow.db", "127.0.0.1", 5123)  # the default store, made absolute
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    opts = dict(zip(cmd[4::2], cmd[5::2]))
    assert opts == {"--backend-store-uri": f"sqlite:///{tmp_path.resolve()}/mlflow.db", "--host": "127.0.0.1",
                    "--port": "5123", "--workers": "1", "--artifacts-destination": f"{tmp_path.resolve()}/mlartifacts"}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert server_command("http://tracking:5000", "0.0.0.0", 80)[0][-2:] == ["--workers", "1"]  # no local root


def test_ui_url_opens_the_training_view():
    assert ui_url("127.0.0.1", 5000) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert ui_url("localhost", 80, "3") == "http://localhost:80/#/experiments/3?workflowType=machine_learning"
    assert ui_url("::1", 5000, "3", "abc") == "http://[::1]:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


@pytest.mark.slow  # ~17 s idle, ~26 s on a loaded 2-core machine (server start-up dominates)
def test_study_ui_serves_the_project_store(tmp_path):
    """`python -m study ui` on an existing store: REST lists the experiment, its run and its artifact."""
    uri, exp_id = prepare(f"sqlite:///{tmp_path}/mlflow.db", "tests")
    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name="ce/resnet18/texdigits/s3")
    client.log_metric(run.info.run_id, "test/miou", 0.4321, step=6)
    csv = tmp_path / "per_class_test.csv"
    csv.write_text("class,iou\nroad,0.9\n")
    client.log_artifact(run.info.run_id, str(csv), "metrics")
    client.set_terminated(run.info.run_id)

    port = free_port()
    log = tmp_path / "ui.log"
    cmd = [sys.executable, "-m", "study", "ui", "--store", uri, "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_healthy(base, proc, log)
        print(f"`study ui` healthy after {ready:.1f} s")
        status, body = get(f"{base}/ajax-api/2.0/mlflow/experiments/search?max_results=100")
        assert status == 200, body[:500]
        exps = {e["name"]: e for e in json.loads(body)["experiments"]}
        assert exps["tests"]["experiment_id"] == exp_id
        assert {"key": EXPERIMENT_KIND_TAG, "value": EXPERIMENT_KIND} in exps["tests"]["tags"]
        status, body = get(f"{base}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
        assert status == 200, body[:500]
        found = json.loads(body)["run"]
        assert found["info"]["run_name"] == "ce/resnet18/texdigits/s3"
        assert found["data"]["metrics"] == [{"key": "test/miou", "value": 0.4321, "timestamp":
                                             found["data"]["metrics"][0]["timestamp"], "step": 6}]
        status, body = get(f"{base}/get-artifact?path=metrics/per_class_test.csv&run_uuid={run.info.run_id}")
        assert (status, body) == (200, b"class,iou\nroad,0.9\n")
        printed = log.read_text()
        assert f"UI: {ui_url('127.0.0.1', port)}" in printed, printed[-2000:]  # the experiment list
        assert "--backend-store-uri " + uri in printed
    finally:
        stop(proc)
    # `study ui` is the server process itself: stopping it frees the port (no orphaned uvicorn behind it)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()[-2000:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.25)
    else:
        raise AssertionError(f"port {port} still served after `study ui` was stopped")


IMPORT_PROBE = """
import sys
from study.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY", sorted(m for m in ("torch", "mlflow", "submitit", "pandas") if m in sys.modules))
"""


def _heavy_imports(args: list[str], cwd: Path) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], capture_output=True, text=True, cwd=cwd,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])), timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY")]
    assert line, (out.stdout, out.stderr)
    return line[0], out.stdout + out.stderr


def test_help_imports_neither_torch_nor_mlflow(tmp_path):
    """`study --help` answers without importing torch, MLflow, submitit or pandas"""
    heavy, out = _heavy_imports(["--help"], tmp_path)
    assert heavy == "HEAVY []" and "usage: study" in out, out


def test_status_of_a_launched_grid_imports_neither_torch_nor_mlflow(tmp_path):
    """`study status` of a launched grid reads the cached expansion and the store with SQL: no torch/MLflow"""
    import yaml

    from study.grid import load_grid
    from study.status import write_cache
    from tests.conftest import tiny_spec

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": tiny_spec(tmp_path), "axes": {"seed": [1, 2]}}))
    uri, exp_id = prepare(f"sqlite:///{tmp_path}/mlflow.db", "tests")
    loaded = load_grid(grid)
    client = MlflowClient(uri)
    run = client.create_run(exp_id, tags={"study.spec_hash": loaded.runs[0].hash})
    client.log_metric(run.info.run_id, "test/miou", 0.25, step=6)
    client.set_terminated(run.info.run_id)
    write_cache(loaded, tmp_path / "submitit")  # what `study launch` writes
    heavy, out = _heavy_imports(["status", str(grid)], tmp_path)
    assert heavy == "HEAVY []", out
    assert "finished: 1  missing: 1" in out and "0.2500" in out, out
    grid.write_text(grid.read_text() + "\n# edited\n")  # a changed grid file is loaded (and checked) again
    heavy, out = _heavy_imports(["status", str(grid)], tmp_path)
    assert "torch" in heavy and "finished: 1  missing: 1" in out, out


def test_ui_never_creates_a_store_or_an_experiment(tmp_path, capsys):
    """`study ui` on a missing store, or with a grid never launched, is a one-line error; nothing is created"""
    import yaml

    from study.cli import main
    from tests.conftest import tiny_spec

    assert main(["ui", "--store", f"sqlite:///{tmp_path}/none.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --store") and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "none.db").exists()
    uri, _ = prepare(f"sqlite:///{tmp_path}/mlflow.db", "other")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": tiny_spec(tmp_path), "axes": {"seed": [1]}}))
    assert main(["ui", "--grid", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "tracking.experiment: 'tests' is not in" in err, err
    assert MlflowClient(uri).get_experiment_by_name("tests") is None
    import argparse

    from study.cli import _ui_experiment

    _, exp_id = prepare(uri, "tests")
    args = argparse.Namespace(grid=str(grid), store="sqlite:///mlflow.db")
    assert _ui_experiment(args) == exp_id and args.store == uri  # the grid's store and experiment

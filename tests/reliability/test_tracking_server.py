"""The MLflow tracking server stopped for a few seconds while a job logs: no metric lost or duplicated."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from .helpers import python_env

OUTAGE_S = 5.0


@pytest.mark.slow
def test_server_outage_mid_run_loses_no_metric(tmp_path, small, mlflow_server):
    """tracking server killed for ~5 s (+ restart) mid-run: the job retries, every train/loss step 1..N logged once"""
    n = 60
    server = mlflow_server()
    raw = small(train={"iterations": n, "eval_interval": 30, "log_interval": 1, "checkpoint_interval": 2})
    raw["tracking"]["uri"] = server.uri
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "job.log", "w")
    # MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, BACKOFF_FACTOR=2: ~4 min in all) are left at
    # their defaults, then RunLogger._retry retries each call 6 times more
    job = subprocess.Popen([sys.executable, "-m", "study", "run", str(spec_path)], stdout=log,
                           stderr=subprocess.STDOUT, cwd=tmp_path, env=python_env())
    try:
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("tests")
        deadline, at_kill = time.time() + 240, None
        while time.time() < deadline and job.poll() is None:
            runs = client.search_runs([exp.experiment_id])
            if runs and int(runs[0].data.tags.get("study.iteration", 0)) >= 2:
                at_kill = int(runs[0].data.tags["study.iteration"])
                server.kill()
                break
            time.sleep(0.2)
        assert at_kill is not None and at_kill < n and job.poll() is None, "the outage must hit a running job"
        time.sleep(OUTAGE_S)
        server.start()  # same port, same sqlite store
        rc = job.wait(300)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    output = (tmp_path / "job.log").read_text()
    assert rc == 0, output[-3000:]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["study.iteration"] == str(n)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, n + 1))  # each step exactly once
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/lr")) == list(range(1, n + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [30, 60]
    assert "test/miou" in run.data.metrics
    stamps = sorted(m.timestamp for m in history)
    gap = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert gap >= OUTAGE_S * 1000, f"no logging pause of {OUTAGE_S} s seen (largest gap {gap} ms)"

"""benchmarks.device: the full mode refuses to run without CUDA; the smoke mode runs every section on CPU
(so the device check cannot rot); on CPU a stop/resume of the resume section is exact."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.device", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_full_mode_without_cuda_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "device.md"
    proc = _run("--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists()


def test_resume_section_is_exact_on_cpu():
    from benchmarks.device import SMOKE, section_resume

    (row,) = section_resume(SMOKE, torch.device("cpu"))
    assert row.value == "|delta mIoU| = 0.0000 points"
    assert row.note.endswith("max |delta weight| 0")


def test_resume_section_detects_a_lost_optimizer_state(monkeypatch):
    """The check can fail: dropping the optimizer moments on resume changes the weights."""
    import benchmarks.device as device

    real = device._train_tiny

    def forgetful(dev, start, stop, state):
        if state is not None:
            state = dict(state, opt=torch.optim.Adam(device._tiny_model().parameters(), lr=3e-3).state_dict())
        return real(dev, start, stop, state)

    monkeypatch.setattr(device, "_train_tiny", forgetful)
    (row,) = device.section_resume(device.SMOKE, torch.device("cpu"))
    assert not row.note.endswith("max |delta weight| 0")


def test_confusion_section_checks_against_torchmetrics_on_cpu():
    from benchmarks.device import SMOKE, section_confusion

    (row,) = section_confusion(replace(SMOKE, conf_maps=2, conf_hw=(16, 32)), torch.device("cpu"))
    assert "matrices equal" in row.note and row.value.endswith("ns/px")


@pytest.mark.slow
def test_smoke_run_covers_every_section(tmp_path):
    out = tmp_path / "device.md"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE RUN on CPU" in text and "no GPU (CPU run)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = [line.split("|")[1].strip() for line in rows]
    assert sections.count("step") == 5 and sections.count("data") == 2 and sections.count("packed") == 2
    assert {"loss", "confusion", "resume"} <= set(sections)
    assert "|delta mIoU| = 0.0000 points" in text.replace("\\|", "|")
    assert text.strip() in proc.stdout  # the printed table is the written one

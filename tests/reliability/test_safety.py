"""Safety: YAML only through the safe loader, checkpoints only with weights_only=True, the tracking
server on 127.0.0.1 unless told otherwise and a warning when bound wider without authentication."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from study import checkpoint as ckpt
from study.cli import build_parser
from study.grid import load_grid
from study.models.pretrained import load_state_file
from study.spec import SpecError, load_spec

from .helpers import REPO, free_port, python_env

SOURCES = sorted(p for d in ("study", "analysis") for p in (REPO / d).rglob("*.py"))


def calls(name: str):
    """(file, line, ast.Call) for every call of ``...name(...)`` in the library sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    yield path.relative_to(REPO), node.lineno, node


def test_yaml_only_safe_loader_in_sources():
    """no yaml.load / unsafe_load / full_load / Loader= anywhere in study/ and analysis/"""
    bad = [f"{p}:{line}" for name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all")
           for p, line, node in calls(name)
           if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "yaml"]
    bad += [f"{p}:{line}" for name in ("safe_load", "dump") for p, line, node in calls(name)
            if any(k.arg in ("Loader", "Dumper") for k in node.keywords)]
    assert SOURCES and not bad, bad


def test_python_object_tag_refused(tmp_path):
    """a !!python/object tag in a run spec or grid is refused (SpecError), nothing is executed"""
    def payload(marker: Path) -> str:
        return f'!!python/object/apply:builtins.open ["{marker}", "w"]'

    live = tmp_path / "LIVE"
    yaml.unsafe_load(f"seed: {payload(live)}\n")  # the payload does run under an unsafe loader
    assert live.exists()
    marker = tmp_path / "PWNED"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"seed: {payload(marker)}\n")
    with pytest.raises(SpecError, match="malformed YAML.*python/object"):
        load_spec(spec)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: g\nbase: {{seed: 1}}\naxes:\n  seed: [{payload(marker)}]\n")
    with pytest.raises(SpecError, match="malformed YAML.*python/object"):
        load_grid(grid)
    assert not marker.exists()


def test_torch_load_only_weights_only_in_sources():
    """every torch.load in study/ and analysis/ passes weights_only=True"""
    found, bad = 0, []
    for p, line, node in calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "torch":
            found += 1
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"{p}:{line}")
    assert found >= 2 and not bad, bad


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_object_refused(tmp_path):
    """a checkpoint (valid digest) or pretrained file holding a pickled object is refused, nothing executed"""
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.pt"
    ckpt.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)  # digest written by save()
    with pytest.raises(ckpt.CorruptCheckpoint, match="cannot be read"):
        ckpt.load(path)
    with pytest.warns(UserWarning, match="cannot be read"):
        state, notes = ckpt.load_latest(tmp_path)
    assert state is None and "cannot be read" in notes[0]
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_state_file(path)
    assert not marker.exists()
    ckpt.save({"model": {"w": torch.ones(2)}}, path)  # a plain state still loads
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.ones(2))


def test_server_default_host_is_loopback():
    """`study server` and `study ui` bind to 127.0.0.1 unless --host is given"""
    parser = build_parser()
    assert parser.parse_args(["server"]).host == "127.0.0.1"
    assert parser.parse_args(["ui"]).host == "127.0.0.1"


def _server_stderr(tmp_path: Path, *args: str) -> tuple[str, str]:
    """Start `study server ARGS`, read its first output, then kill its process group (it and mlflow)."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "study", "server", "--store", f"sqlite:///{tmp_path}/s.db",
                                 "--port", str(free_port()), *args], stdout=o, stderr=e, cwd=tmp_path,
                                env=python_env(), start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and "mlflow" not in out.read_text() and proc.poll() is None:
                time.sleep(0.2)  # the command line is printed just before the server starts
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return out.read_text(), err.read_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_server_wide_bind_warns_with_auth_instructions(tmp_path, host):
    """`study server --host 0.0.0.0` warns (with how to enable MLflow auth); 127.0.0.1 does not"""
    stdout, stderr = _server_stderr(tmp_path, "--host", host)
    assert f"--host {host}" in stdout, (stdout, stderr)
    if host == "0.0.0.0":
        assert "WARNING" in stderr and "without authentication" in stderr, stderr
        assert "--app-name basic-auth" in stderr and "MLFLOW_TRACKING_USERNAME" in stderr, stderr
    else:
        assert "WARNING" not in stderr, stderr

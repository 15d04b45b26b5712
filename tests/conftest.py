"""Shared fixtures: a real sqlite MLflow store per test, tiny run specs, the one-node Slurm cluster."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import pytest  # noqa: E402

from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401


def tiny_spec(tmp_path, **sections) -> dict:
    """A run spec dict small enough to train in a few seconds on one CPU core."""
    raw = {
        "data": {
            "name": "texdigits",
            "root": str(tmp_path / "data"),
            "texdigits": {"num_train": 12, "num_val": 4, "num_test": 4, "height": 48, "width": 64, "seed": 0},
        },
        "model": {"arch": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16},
        "loss": {"name": "ce"},
        "train": {"iterations": 6, "batch_size": 2, "eval_interval": 3, "log_interval": 2, "threads": 1,
                  "num_overlays": 1},
        "seed": 3,
        "tracking": {"experiment": "tests", "uri": f"sqlite:///{tmp_path}/mlflow.db",
                     "checkpoint_root": str(tmp_path / "checkpoints")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def tiny(tmp_path):
    return lambda **sections: tiny_spec(tmp_path, **sections)

"""The trainer end to end on CPU against a real sqlite MLflow store: logging, resume, failures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from study import losses as study_losses
from study.spec import from_dict, spec_hash
from study.train import IterationBatchSampler, TrainingFailed, checkpoint_dir, train


def client_for(spec):
    return MlflowClient(spec.tracking.uri if spec.tracking.uri.startswith("sqlite:////") else None)


def artifacts(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_run_logs_everything_to_mlflow(tiny):
    spec = from_dict(tiny(loss={"name": "recall", "params": {"ema": 0.5}}))
    result = train(spec, progress=False)
    client = MlflowClient(spec.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "recall(ema=0.5)/resnet18/texdigits/s3"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "tests" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["study.spec_hash"] == spec_hash(spec)
    assert (tags["study.loss"], tags["study.loss_name"], tags["study.dataset"], tags["study.backbone"],
            tags["study.seed"]) == ("recall(ema=0.5)", "recall", "texdigits", "resnet18", "3")
    assert len(json.loads(tags["study.class_names"])) == 16
    assert "torch" in json.loads(tags["study.versions"]) and tags["study.iteration"] == "6"
    params = run.data.params
    assert params["loss.name"] == "recall" and params["train.iterations"] == "6" and params["loss.params.ema"] == "0.5"
    # per-step train loss, per-class recall weights, per-eval metrics, final test metrics
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    weights = [k for k in run.data.metrics if k.startswith("recall_weight/")]
    assert len(weights) == 16
    assert [m.step for m in client.get_metric_history(result.run_id, "recall_weight/road")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(result.run_id, "val/miou")] == [3, 6]
    for key in ("test/miou", "test/macc", "test/mprec", "test/pixel_acc", "test/fwiou", "val/iou/road",
                "val/recall/road", "val/precision/road", "test/iou/building"):
        assert key in run.data.metrics, key
    assert result.metrics["test/miou"] == pytest.approx(run.data.metrics["test/miou"])
    files = set(artifacts(client, result.run_id))
    for name in ("spec.yaml", "metrics/per_class_test.csv", "metrics/confusion_test.npy",
                 "metrics/confusion_test.png", "predictions/test_000.png", "checkpoints/best.pt"):
        assert name in files, (name, files)
    local = Path(client.download_artifacts(result.run_id, "metrics/confusion_test.npy"))
    mat = np.load(local)
    assert mat.shape == (16, 16) and mat.sum() == 4 * 48 * 64
    logged_spec = yaml.safe_load(Path(client.download_artifacts(result.run_id, "spec.yaml")).read_text())
    assert from_dict(logged_spec) == spec


def test_resume_continues_same_run_with_identical_results(tiny, tmp_path):
    raw = tiny(loss={"name": "recall", "params": {"ema": 0.5}}, train={"checkpoint_interval": 1})
    whole = train(from_dict(raw), progress=False)

    raw2 = tiny(loss={"name": "recall", "params": {"ema": 0.5}}, train={"checkpoint_interval": 1})
    raw2["tracking"] = dict(raw2["tracking"], experiment="tests-resume")
    spec2 = from_dict(raw2)
    part = train(spec2, progress=False, stop_after=4)
    assert part.iteration == 4 and not part.metrics
    assert MlflowClient(spec2.tracking.uri).get_run(part.run_id).info.status == "RUNNING"
    rest = train(spec2, progress=False)
    assert rest.resumed and rest.run_id == part.run_id and rest.iteration == 6
    assert rest.metrics == whole.metrics  # bitwise: same batches, augmentation, EMA weights, RNG
    w1 = torch.load(checkpoint_dir(from_dict(raw)) / "last.pt", weights_only=True)
    w2 = torch.load(checkpoint_dir(spec2) / "last.pt", weights_only=True)
    for k in w1["model"]:
        assert torch.equal(w1["model"][k], w2["model"][k]), k
    assert torch.equal(w1["loss"]["ema_weights"], w2["loss"]["ema_weights"])
    client = MlflowClient(spec2.tracking.uri)
    assert client.get_run(rest.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(rest.run_id).info.experiment_id])) == 1


def test_corrupt_checkpoint_falls_back_to_previous(tiny):
    spec = from_dict(tiny(train={"checkpoint_interval": 1}))
    part = train(spec, progress=False, stop_after=3)
    last = checkpoint_dir(spec) / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match="digest mismatch"):
        rest = train(spec, progress=False)
    assert rest.run_id == part.run_id and rest.iteration == 6
    run = MlflowClient(spec.tracking.uri).get_run(rest.run_id)
    assert "digest mismatch" in run.data.tags["study.warning"]
    assert run.info.status == "FINISHED"


class NaNLoss(torch.nn.Module):
    """Returns NaN from the third call on (a diverging run)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.calls = 0

    def forward(self, logits, target):
        self.calls += 1
        value = logits.float().mean() * 0
        return value + float("nan") if self.calls >= 3 else value


def test_nan_loss_fails_the_run_with_reason(tiny, monkeypatch):
    from study.components import Component

    monkeypatch.setitem(study_losses.LOSSES, "nan_after_2",
                        Component("nan_after_2", NaNLoss, supplied=("num_classes", "ignore_index")))
    spec = from_dict(tiny(loss={"name": "nan_after_2"}))
    with pytest.raises(TrainingFailed, match="non-finite loss"):
        train(spec, progress=False)
    client = MlflowClient(spec.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite loss (nan) at iteration 3" in run.data.tags["study.failure"]


def test_batch_order_depends_only_on_seed_and_iteration():
    full = list(IterationBatchSampler(10, 3, seed=5, start=0, total=9))
    tail = list(IterationBatchSampler(10, 3, seed=5, start=4, total=9))
    assert full[4:] == tail
    epoch0 = [i for b in full[:3] for i, _ in b] + [full[3][0][0]]
    assert sorted(epoch0) == list(range(10))  # every sample once per epoch
    assert full != list(IterationBatchSampler(10, 3, seed=6, start=0, total=9))


def test_cli_run_prints_where_the_run_is(tiny, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny(train={"iterations": 2, "eval_interval": 2})))
    out = subprocess.run([sys.executable, "-m", "study", "run", str(path), "--set", "seed=4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ce/resnet18/texdigits/s4" in out.stdout and "MLflow run" in out.stdout and "test/miou=" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "study", "run", str(path), "--set", "loss.name=hinge"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "loss.name" in bad.stderr and "recall" in bad.stderr


@pytest.mark.parametrize("loss", ["ce", "dense_crf", "dfr"])
def test_training_on_scribbles_finishes(tiny, loss):
    """data.supervision: scribble trains on scribbles (a few % of the training pixels labelled), the
    regularized losses get the image (and DFR the network's features); the run is FINISHED and logs
    the labelled fraction of each split (validation and test keep full labels)."""
    raw = tiny(loss={"name": loss}, train={"iterations": 2, "eval_interval": 2, "log_interval": 1, "threads": 1,
                                           "num_overlays": 1})
    raw["data"]["supervision"] = "scribble"
    spec = from_dict(raw)
    result = train(spec, progress=False)
    run = MlflowClient(spec.tracking.uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test/miou" in run.data.metrics
    m = run.data.metrics
    assert 0.0 < m["data/labelled_fraction/train"] < 0.2
    assert m["data/labelled_fraction/val"] == m["data/labelled_fraction/test"] == 1.0

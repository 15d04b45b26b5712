"""A run's page in the MLflow UI: short distinct names, the description, the dataset input, summary
copies and system metrics, written by real training runs into a real sqlite store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis import report
from study import runpage, runrecord, tracking
from study.data import data_fingerprint
from study.grid import load_grid
from study.spec import from_dict, spec_hash
from study.train import train


def test_run_name_without_axes_is_loss_backbone_dataset_seed(tiny):
    spec = from_dict(tiny(loss={"name": "recall", "params": {"ema": 0.5}}))
    assert runpage.run_name(spec) == "recall(ema=0.5)/resnet18/texdigits/s3"
    assert runpage.run_name(spec, {}) == "recall(ema=0.5)/resnet18/texdigits/s3"


def test_run_names_of_a_grid_put_the_varying_axes_first_and_differ(tmp_path, tiny):
    raw = {"name": "names", "base": tiny(),
           "axes": {"train.optimizer.lr": [0.01, 0.001], "loss": ["ce", {"name": "focal", "params": {"gamma": 1.0}}],
                    "seed": [1, 2]}}
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    grid = load_grid(path)
    names = [runpage.run_name(r.spec, r.axes) for r in grid.runs]
    assert len(set(names)) == len(names) == 8
    assert "lr=0.01/ce/s1/resnet18/texdigits" in names
    for run, name in zip(grid.runs, names):  # the leading parts alone tell the runs apart
        lead = name.split("/")[:3]
        assert lead == [f"lr={run.axes['train.optimizer.lr']}", run.axes["loss"], f"s{run.spec.seed}"], name
    assert len({tuple(n.split("/")[:3]) for n in names}) == 8


def test_summary_metric_keys_sort_before_every_study_section():
    copies = runpage.summary_metrics({"test/miou": 0.5, "test/macc": 0.6, "val/miou": 0.1, "train/loss": 1.0})
    assert copies == {"Summary/test_miou": 0.5, "Summary/test_macc": 0.6}
    study_keys = ["recall_weight/road", "test/iou/road", "test/miou", "train/loss", "val/miou"]
    # the UI sorts chart sections (the key up to its last '/') by code unit, as Python sorts str
    sections = sorted({k.rsplit("/", 1)[0] for k in [*study_keys, *copies]})
    assert sections[0] == "Summary"


def tags_of(**extra) -> dict[str, str]:
    tags = {"study.loss": "focal(gamma=2)", "study.loss_name": "focal", "study.loss_params": '{"gamma": 2.0}',
            "study.dataset": "texdigits", "study.data_fingerprint": "0123456789abcdef", "study.backbone": "resnet18",
            "study.arch": "deeplabv3plus", "study.seed": "7"}
    return {**tags, **extra}


def test_description_states_setting_results_and_links():
    text = runpage.run_description(tags_of(), {"test/miou": 0.45678, "test/macc": 0.5, "test/mprec": 0.61234,
                                               "test/best_iteration": 300.0}, "4", "abc")
    assert "`focal` (`gamma` = 2.0)" in text
    assert "`texdigits` (content digest `0123456789abcdef`)" in text and "| Seed | 7 |" in text
    assert "| 45.68 | 50.00 | 61.23 | 300 |" in text  # % with 2 decimals, written from the values above
    assert "[metrics/per_class_test.csv](#/experiments/4/runs/abc/artifacts/metrics/per_class_test.csv)" in text
    assert "[metrics/confusion_test.png](#/experiments/4/runs/abc/artifacts/metrics/confusion_test.png)" in text
    assert "Failed" not in text


def test_description_of_a_failed_run_holds_the_reason_in_full(tiny):
    spec = from_dict(tiny())
    uri, exp_id = tracking.prepare(spec.tracking.uri, spec.tracking.experiment)
    reason = "TrainingFailed: " + " ".join(f"line{i}" for i in range(600))  # ~4.6k characters
    logger = runrecord.start(spec, spec_hash(spec), uri, exp_id, None, None, None, ["a", "b"], [1, 2])
    runrecord.fail(logger, reason, 3)
    run = MlflowClient(uri).get_run(logger.run_id)
    text = run.data.tags[runpage.NOTE_TAG]
    assert run.info.status == "FAILED" and reason in text and "No test metrics" in text

    long_reason = "x" * 9000
    logger = runrecord.start(spec, spec_hash(spec), uri, exp_id, None, None, None, ["a", "b"], [1, 2])
    runrecord.fail(logger, long_reason, 0)
    client = MlflowClient(uri)
    text = client.get_run(logger.run_id).data.tags[runpage.NOTE_TAG]
    assert "x" * runrecord.FAILURE_CHARS in text and "artifact failure.txt" in text and len(text) < 8000
    full = Path(client.download_artifacts(logger.run_id, "failure.txt")).read_text()
    assert full == long_reason


def test_finished_run_has_description_dataset_summary_and_no_system_metrics(tiny):
    spec = from_dict(tiny(train={"iterations": 4, "eval_interval": 2, "log_interval": 2, "threads": 1,
                                 "num_overlays": 1}))
    result = train(spec, progress=False)
    client = MlflowClient(spec.tracking.uri)
    run = client.get_run(result.run_id)
    m = run.data.metrics
    text = run.data.tags[runpage.NOTE_TAG]
    miou = re.search(r"\| test mIoU .*\n.*\n\| ([0-9.]+) \|", text)
    assert miou and float(miou.group(1)) == pytest.approx(100 * m["test/miou"], abs=0.006), text
    assert f"content digest `{data_fingerprint(spec.data)}`" in text
    # the dataset input: name, digest = content fingerprint, source = the data root
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "texdigits" and inp.dataset.digest == data_fingerprint(spec.data)
    assert json.loads(inp.dataset.source) == {"uri": str(Path(spec.data.root).resolve())}
    # summary copies equal the originals; the validation curve is copied step by step
    for key in ("test/miou", "test/macc", "test/mprec", "test/best_iteration"):
        assert m[runpage.summary_key(key)] == m[key]
    hist = lambda k: [(x.step, x.value) for x in client.get_metric_history(result.run_id, k)]  # noqa: E731
    assert hist("Summary/val_miou") == hist("val/miou") and len(hist("val/miou")) == 2
    assert not [k for k in m if k.startswith("system/")]  # off by default


def test_system_metrics_logged_when_switched_on(tiny):
    pytest.importorskip("psutil", reason="MLflow's system metrics need psutil")
    raw = tiny(train={"iterations": 2, "eval_interval": 2, "log_interval": 1, "threads": 1, "num_overlays": 1})
    raw["tracking"].update(system_metrics=True, system_metrics_interval=1.0)
    spec = from_dict(raw)
    result = train(spec, progress=False)
    metrics = MlflowClient(spec.tracking.uri).get_run(result.run_id).data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


def test_parent_description_fits_a_tag_and_says_what_was_left_out():
    claims = pd.DataFrame({"claim": ["recall beats ce on macc"], "held": ["yes"], "diff": [1.5]})
    summary = pd.DataFrame({"loss": [f"loss{i}" for i in range(400)], "dataset": "texdigits", "backbone": "r18",
                            "n": 3, "miou": 50.0, "miou_std": 1.0, "miou_ci95": 2.0, "miou_rel_ce": 0.0,
                            "macc": 60.0, "macc_std": 1.0, "mprec": 55.0, "mprec_std": 1.0})
    text = report.parent_description("g", claims, summary, "rid", "figures/miou_macc.png")
    assert len(text) <= report.DESCRIPTION_CHARS + 300 and len(text) < 8000
    assert "recall beats ce on macc" in text and "| loss0 |" in text
    assert "![figures/miou_macc.png](get-artifact?path=figures/miou_macc.png&run_uuid=rid)" in text
    shown = len(re.findall(r"^\| loss\d+ \|", text, flags=re.M))
    assert 0 < shown < 400 and f"*{400 - shown} more row(s) in tables/summary.md.*" in text
    assert "95% CI" not in text  # the headline keeps means and sds

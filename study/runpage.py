"""What one run's page in the MLflow UI shows: a short distinct name, a markdown description, and
summary metric copies that the UI lists first.

Contracts (MLflow 3 UI, checked against its source and in a browser, tests/test_ui_browser.py):

- The run description is the run tag ``mlflow.note.content``, rendered as GitHub-flavoured markdown
  (tables, links, images allowed).
- The "Model metrics" tab groups metric charts into sections named by the key up to its last ``/``
  and sorts sections and the charts inside them by plain code-unit order (JavaScript ``sort()``),
  so ``recall_weight/*`` (16 charts) precedes ``test/*``, ``train/*`` and ``val/*``. The study's
  metric keys are read by ``analysis.collect`` and are never renamed; the headline numbers are
  *also* logged under ``Summary/`` (capital S sorts before every lower-case section), see
  :func:`summary_metrics`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

NOTE_TAG = "mlflow.note.content"
SUMMARY_SECTION = "Summary"
#: The test split's headline metrics copied under ``Summary/`` (``test/miou`` -> ``Summary/test_miou``).
SUMMARY_KEYS = ("test/miou", "test/macc", "test/mprec", "test/pixel_acc", "test/best_iteration")
#: The validation curve copied under ``Summary/`` step by step.
SUMMARY_CURVES = ("val/miou",)
PER_CLASS_CSV = "metrics/per_class_test.csv"
CONFUSION_PNG = "metrics/confusion_test.png"


def summary_key(key: str) -> str:
    """``test/miou`` -> ``Summary/test_miou``: one section, sorted before the study's own sections."""
    return f"{SUMMARY_SECTION}/{key.replace('/', '_')}"


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The copies of the headline test metrics present in ``metrics`` (keys of :data:`SUMMARY_KEYS`)."""
    return {summary_key(k): float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}


def _axis_part(path: str, value: Any, parts: Mapping[str, str]) -> str:
    """The name part of one grid axis: the loss label, backbone, data set or seed part when the axis
    is one of those, else ``{last key}={value}``."""
    if path == "loss" or path.startswith("loss."):
        return parts["loss"]
    if path in ("model.backbone", "data.name", "seed"):
        return parts[path]
    return f"{path.rsplit('.', 1)[-1]}={value}"


def run_name(spec, axes: Mapping[str, Any] | None = None) -> str:
    """A short run name whose first parts are the grid's varying axes.

    Without axes: ``{loss label}/{backbone}/{data set}/s{seed}``. Under a grid (``axes``: dotted path
    -> value label, the run's combination) the parts of the axes come first in the grid's axis order,
    then the remaining fixed parts in the order above, each once: a grid over ``loss`` and ``seed``
    names its runs ``recall/s2/resnet18/texdigits``, one over ``train.optimizer.lr``
    ``lr=0.01/ce/resnet18/texdigits/s1``. Runs of one grid differ in their combination, so their
    names differ in the leading parts, the ones the UI shows when it cuts a long name.
    """
    from study.spec import loss_label

    parts = {"loss": loss_label(spec), "model.backbone": spec.model.backbone, "data.name": spec.data.name,
             "seed": f"s{spec.seed}"}
    order: list[str] = []
    for path, value in (axes or {}).items():
        part = _axis_part(path, value, parts)
        if part not in order:
            order.append(part)
    order += [p for p in parts.values() if p not in order]
    return "/".join(order)


def _pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100.0 * value:.2f}"


def _loss_line(tags: Mapping[str, str]) -> str:
    params = json.loads(tags.get("study.loss_params") or "{}")
    shown = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in sorted(params.items())) or "defaults"
    return f"| Loss | `{tags.get('study.loss_name', '?')}` ({shown}) |"


def _setting_rows(tags: Mapping[str, str]) -> list[str]:
    return [
        "| | |", "|---|---|",
        _loss_line(tags),
        f"| Data set | `{tags.get('study.dataset', '?')}` (content digest `{tags.get('study.data_fingerprint', '?')}`) |",
        f"| Model | `{tags.get('study.arch', '?')}` / `{tags.get('study.backbone', '?')}` |",
        f"| Seed | {tags.get('study.seed', '?')} |",
    ]


def _result_lines(metrics: Mapping[str, float], artifact_link) -> list[str]:
    if "test/miou" not in metrics:
        return ["No test metrics: the run did not reach its final evaluation."]
    best = metrics.get("test/best_iteration")
    return [
        "| test mIoU | test mAcc | test mPrec | best iteration |", "|---:|---:|---:|---:|",
        f"| {_pct(metrics.get('test/miou'))} | {_pct(metrics.get('test/macc'))} | "
        f"{_pct(metrics.get('test/mprec'))} | {'–' if best is None else int(best)} |",
        "",
        "Test metrics in %, of the weights with the best validation mIoU (evaluated at the best iteration).",
        "",
        f"- Per-class IoU, recall, precision: [{PER_CLASS_CSV}]({artifact_link(PER_CLASS_CSV)})",
        f"- Confusion matrix (rows = ground truth): [{CONFUSION_PNG}]({artifact_link(CONFUSION_PNG)})",
    ]


def run_description(tags: Mapping[str, str], metrics: Mapping[str, float], experiment_id: str, run_id: str) -> str:
    """The run's description (markdown) from its tags and latest metrics.

    States the loss and its parameters (tag ``study.loss_params``), data set with its content digest,
    model, seed, the test mIoU/mAcc/mPrec and best iteration when the run finished, the failure reason
    in full (tag ``study.failure``) when it failed, and links to the per-class CSV and the confusion
    PNG: the link text is the artifact path, the target the UI's artifact view of this run.
    """
    def artifact_link(path: str) -> str:
        return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"

    lines = [f"**{tags.get('study.loss', tags.get('study.loss_name', '?'))}** on "
             f"**{tags.get('study.dataset', '?')}**, {tags.get('study.backbone', '?')}, seed {tags.get('study.seed', '?')}",
             "", *_setting_rows(tags), ""]
    failure = tags.get("study.failure")
    if failure:
        lines += ["### Failed", "", "```text", failure.replace("```", "'''"), "```", ""]
    lines += ["### Result", "", *_result_lines(metrics, artifact_link)]
    if tags.get("study.axes"):
        axes = json.loads(tags["study.axes"])
        lines += ["", f"Grid `{tags.get('study.grid', '?')}`, combination: "
                  + ", ".join(f"`{k}` = {v}" for k, v in axes.items())]
    return "\n".join(lines) + "\n"

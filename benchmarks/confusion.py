"""Confusion-matrix update: 500 label maps of 512x1024, 19 classes (``--quick``: 40 maps).

Predictions and targets are generated once (int64, as ``logits.argmax(1)`` and the loader give
them; ~10 % ignored target pixels, predictions agreeing with the target ~70 % of the time) and fed
in batches of 5 images to:

- ``study.metrics.ConfusionMatrix.update`` (ours);
- a ptsemseg-style ``runningScore`` (the study's metrics code, re-written here): a Python loop over
  the images of the batch, each flattened, masked with ``(t >= 0) & (t < C)``, gathered with the
  boolean mask and counted by ``np.bincount(C * t + p, minlength=C * C)``;
- torchmetrics ``MulticlassConfusionMatrix(ignore_index=255, validate_args=False)`` (its fastest
  setting: the default ``validate_args=True`` adds checks of the inputs on every update);
- ``ConfusionMatrix._counts_masked`` on the whole batch (the device-generic path, which was the CPU
  implementation before the chunked numpy one; reported only).

One round passes all images through each of them (interleaved); all matrices are checked equal.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from benchmarks._common import Row, interleaved, ratio_row
from study.metrics import ConfusionMatrix

NAME = "confusion"
C = 19
IGNORE = 255
BATCH = 5


class NumpyRunningScore:
    """The study's per-image numpy confusion matrix (ptsemseg ``runningScore.update``)."""

    def __init__(self, n_classes: int) -> None:
        self.n = n_classes
        self.mat = np.zeros((n_classes, n_classes), dtype=np.int64)

    def _hist(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        mask = (t >= 0) & (t < self.n)
        return np.bincount(self.n * t[mask].astype(int) + p[mask], minlength=self.n ** 2).reshape(self.n, self.n)

    def update(self, targets: np.ndarray, preds: np.ndarray) -> None:
        for t, p in zip(targets, preds):
            self.mat += self._hist(t.flatten(), p.flatten())


def make_labels(n_images: int, h: int = 512, w: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n_images, h, w), generator=g)
    target[torch.rand((n_images, h, w), generator=g) < 0.1] = IGNORE
    pred = torch.randint(0, C, (n_images, h, w), generator=g)
    agree = torch.rand((n_images, h, w), generator=g) < 0.7
    pred = torch.where(agree & (target != IGNORE), target, pred)
    return pred, target


def run(quick: bool = False) -> list[Row]:
    n_images = 40 if quick else 500
    repeats = 3
    pred, target = make_labels(n_images)
    pred_np, target_np = pred.numpy(), target.numpy()
    batches = [(i, min(i + BATCH, n_images)) for i in range(0, n_images, BATCH)]
    results: dict[str, torch.Tensor] = {}

    def ours() -> None:
        cm = ConfusionMatrix(C, ignore_index=IGNORE)
        for a, b in batches:
            cm.update(pred[a:b], target[a:b])
        results["ours"] = cm.mat.clone()

    def numpy_loop() -> None:
        rs = NumpyRunningScore(C)
        for a, b in batches:
            rs.update(target_np[a:b], pred_np[a:b])
        results["numpy"] = torch.from_numpy(rs.mat.copy())

    def tm() -> None:
        m = MulticlassConfusionMatrix(C, ignore_index=IGNORE, validate_args=False)
        for a, b in batches:
            m.update(pred[a:b], target[a:b])
        results["torchmetrics"] = m.compute().long()

    def masked() -> None:
        cm = ConfusionMatrix(C, ignore_index=IGNORE)
        for a, b in batches:  # the device-generic path (the CPU implementation before the chunked one)
            cm.mat.add_(cm._counts_masked(pred[a:b].reshape(-1), target[a:b].reshape(-1)))
        results["masked"] = cm.mat.clone()

    times = interleaved({"ours": ours, "numpy": numpy_loop, "torchmetrics": tm, "masked": masked},
                        repeats=repeats, warmup=1)
    if not all(torch.equal(results["ours"], results[k]) for k in ("numpy", "torchmetrics", "masked")):
        raise AssertionError("confusion matrices differ between ours, the numpy loop and torchmetrics")
    label = f"{n_images} x 512x1024, {C} classes"
    px = n_images * 512 * 1024
    rows = [ratio_row(f"confusion update {label} vs numpy bincount loop: speed-up", times, "ours", "numpy", 5.0,
                      higher_is_better=True),
            ratio_row(f"confusion update {label} vs torchmetrics: speed-up", times, "ours", "torchmetrics", 1.0,
                      higher_is_better=True)]
    rows.append(ratio_row(f"confusion update {label}: CPU chunked path vs masked full-tensor path (previous "
                          "implementation): speed-up", times, "ours", "masked", None, higher_is_better=True))
    ns = np.median(times["ours"]) / px * 1e9
    rows[0].measured += f" ({ns:.2f} ns/px)"
    return rows

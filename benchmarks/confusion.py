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
- the device path (``study.metrics._counts_device``: overflow bin + ``scatter_add_``, no host
  sync) run on the CPU tensors of the whole batch (reported only);
- the floor: ``pred.sum() + target.sum()`` per batch, i.e. reading both int64 maps once with the same
  torch threads; no exact count can read less.

One round passes all images through each of them (interleaved); all matrices are checked equal.
Target: ours <= 3x the floor (the per-image numpy loop's ratio to the floor is reported beside it).
Reported too: ours and the floor both with 1 torch thread (the per-core cost; when other processes
load the second core, the 2-thread floor's parallel region waits for it and the 2-thread ratio
flatters ours).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from benchmarks._common import Row, interleaved, ratio_row
from study.metrics import ConfusionMatrix, _counts_device

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

    def device_path() -> None:
        mat = torch.zeros(C, C, dtype=torch.int64)
        for a, b in batches:
            mat.add_(_counts_device(pred[a:b].reshape(-1), target[a:b].reshape(-1), C, IGNORE))
        results["device path"] = mat

    sink = [0]

    def floor() -> None:
        for a, b in batches:
            sink[0] += int(pred[a:b].sum() + target[a:b].sum())

    def single_thread(fn):
        def run() -> None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)
        return run

    times = interleaved({"ours": ours, "floor": floor, "numpy": numpy_loop, "torchmetrics": tm,
                         "device path": device_path, "ours 1 thread": single_thread(ours),
                         "floor 1 thread": single_thread(floor)}, repeats=repeats, warmup=1)
    if not all(torch.equal(results["ours"], results[k]) for k in ("numpy", "torchmetrics", "device path")):
        raise AssertionError("confusion matrices differ between ours, the numpy loop, torchmetrics, the device path")
    label = f"{n_images} x 512x1024, {C} classes, batches of {BATCH}, {torch.get_num_threads()} threads"
    px = n_images * 512 * 1024
    ns = lambda name: f" ({np.median(times[name]) / px * 1e9:.2f} ns/px)"  # noqa: E731
    rows = [ratio_row(f"confusion update {label} vs floor (read both int64 maps once: pred.sum() + target.sum())",
                      times, "ours", "floor", 3.0),
            ratio_row("confusion: per-image numpy bincount loop vs the same floor (beside ours)", times, "numpy",
                      "floor", None),
            ratio_row(f"confusion update {label} vs numpy bincount loop: speed-up", times, "ours", "numpy", None,
                      higher_is_better=True),
            ratio_row(f"confusion update {label} vs torchmetrics: speed-up", times, "ours", "torchmetrics", 1.0,
                      higher_is_better=True),
            ratio_row(f"confusion update {label}: CPU path vs the device path run on CPU: speed-up", times, "ours",
                      "device path", None, higher_is_better=True),
            ratio_row("confusion update with 1 torch thread vs the floor with 1 thread (per-core cost; immune to "
                      "a loaded second core)", times, "ours 1 thread", "floor 1 thread", None)]
    rows[0].measured += ns("ours")
    rows[0].baseline += ns("floor")
    rows[1].measured += ns("numpy")
    return rows

"""Step cost of the weakly supervised losses against partial cross entropy, on CPU.

Demo size: batch 4, 16 classes, 64 x 128 (``--quick``: batch 2, 32 x 64), scribble-like targets
(~5 % labelled pixels), RGB images in 0..255. Two settings, each timed interleaved against the
partial CE (``ce`` with ``ignore_index``):

- loss only: forward + backward of the loss on leaf logits (and, for ``dfr``, leaf features
  ``[N, 96, H/8, W/8]``, the ViT token map, with the feature consistency head);
- training step: the DeepLabV3+ ResNet-18 forward + backward with the loss (for ``dfr`` the model
  returns its decoder features).

Also printed (row "pairwise term"): the unweighted DenseCRF sum at this size on random
predictions, to size ``weight`` against the released 2e-9 at PASCAL crops.
"""

from __future__ import annotations

import torch

from benchmarks._common import Row, interleaved, ratio_row
from study.losses.ce import CrossEntropy
from study.losses.dense_crf import DenseCRFLoss
from study.losses.dfr import DynamicFeatureRegularizedLoss
from study.models.builders import build_model

NAME = "weak_losses"
IGNORE = 255


def make_inputs(n: int, c: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g).requires_grad_(True)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) > 0.05] = IGNORE
    image = torch.rand(n, 3, h, w, generator=g) * 255
    features = torch.randn(n, 96, h // 8, w // 8, generator=g).requires_grad_(True)
    return logits, target, image, features


def _loss_step(fn, *leaves):
    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn().backward()
    return step


def loss_only_rows(n, c, h, w, repeats) -> list[Row]:
    logits, target, image, feats = make_inputs(n, c, h, w)
    ce = CrossEntropy(c)
    crf = DenseCRFLoss(c)
    dfr = DynamicFeatureRegularizedLoss(c, feature_channels=96)
    steps = {"partial_ce": _loss_step(lambda: ce(logits, target), logits),
             "dense_crf": _loss_step(lambda: crf(logits, target, image=image), logits),
             "dfr": _loss_step(lambda: dfr(logits, target, image=image, features=feats), logits, feats)}
    times = interleaved(steps, repeats=repeats, warmup=1)
    label = f"{n}x{c}x{h}x{w}"
    rows = [ratio_row(f"{k} loss fwd+bwd {label} vs partial CE", times, k, "partial_ce", None)
            for k in ("dense_crf", "dfr")]
    with torch.no_grad():
        pair_sum = crf.regularizer(logits.detach(), image).item()
    rows.append(Row(f"pairwise term sum_k S_k^T W (1-S_k) per image, {label}, scale 0.5", f"{pair_sum:.4g}"))
    return rows


def model_step_rows(n, c, h, w, repeats) -> list[Row]:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "resnet18", c).train()
    _, target, image, _ = make_inputs(n, c, h, w)
    x = (image - 128.0) / 64.0
    ce, crf = CrossEntropy(c), DenseCRFLoss(c)
    dfr = DynamicFeatureRegularizedLoss(c, feature_channels=model.feature_channels)
    params = list(model.parameters()) + list(dfr.parameters())

    def step(loss_fn):
        def run() -> None:
            for p in params:
                p.grad = None
            if loss_fn is dfr:
                logits, feats = model(x, return_features=True)
                dfr(logits, target, image=image, features=feats).backward()
            else:
                logits = model(x)
                (ce(logits, target) if loss_fn is ce else crf(logits, target, image=image)).backward()
        return run

    times = interleaved({"partial_ce": step(ce), "dense_crf": step(crf), "dfr": step(dfr)}, repeats=repeats, warmup=1)
    label = f"{n}x3x{h}x{w}"
    return [ratio_row(f"{k} training step DeepLabV3+ R18 {label} vs partial CE", times, k, "partial_ce", None)
            for k in ("dense_crf", "dfr")]


def run(quick: bool = False) -> list[Row]:
    n, c, h, w = (2, 16, 32, 64) if quick else (4, 16, 64, 128)
    repeats = 3 if quick else 7
    return loss_only_rows(n, c, h, w, repeats) + model_step_rows(n, c, h, w, repeats)

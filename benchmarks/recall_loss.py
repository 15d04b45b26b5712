"""Recall loss forward + backward on CPU against ``F.cross_entropy(ignore_index=255)``.

Logits ``(8, 19, 512, 1024)`` float32 (``--quick``: ``(2, 19, 128, 256)``), targets with ~10 %
ignored pixels and two classes absent. Every variant computes the loss and its gradient with
respect to the logits; each round times CE and the variant back to back (interleaved).

The released code's recall loss (PotatoTian/recall-semseg, ``ptsemseg/loss``) is re-implemented in
:func:`released_recall_loss` as a reference: argmax over the classes, ``torch.unique`` of the target
and of the false-negative pixels (boolean-mask gather), counters that start at 1 and are filled per
class in a Python loop, then plain CE weighted per pixel and averaged over all pixels. Its ignore
handling crashes as released (the released recall loss crashes on them), so here ignored pixels are left out of the
counts and get weight 0, which is what ``RecallLoss(official_compat=True)`` computes; the benchmark
checks the two agree before timing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._common import Row, interleaved, ratio_row
from study.losses import build_loss

NAME = "recall_loss"
IGNORE = 255


def make_inputs(shape: tuple[int, int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (leaf, requires grad) and an int64 target with ~10 % ignore and 2 absent classes."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g).mul_(2.0).requires_grad_(True)
    target = torch.randint(0, c - 2, (n, h, w), generator=g)  # classes c-2, c-1 absent
    target[torch.rand((n, h, w), generator=g) < 0.1] = IGNORE
    return logits, target


def released_recall_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                         ignore_index: int = IGNORE) -> torch.Tensor:
    """The released recall loss, computed the way the released code does (see module docstring)."""
    pred = logits.argmax(1)
    valid = target != ignore_index
    wrong = (pred != target) & valid
    gt_ids, gt_counts = torch.unique(target[valid], return_counts=True)
    fn_ids, fn_counts = torch.unique(target[wrong], return_counts=True)
    gt_counter = torch.ones(num_classes)
    fn_counter = torch.ones(num_classes)
    for cls, count in zip(gt_ids.tolist(), gt_counts.tolist()):  # host sync + loop over classes
        gt_counter[cls] = count
    for cls, count in zip(fn_ids.tolist(), fn_counts.tolist()):
        fn_counter[cls] = count
    weight = fn_counter / gt_counter
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    w_pix = weight[torch.where(valid, target, 0)] * valid
    return (w_pix * ce).mean()


def _fwd_bwd(loss_fn, logits: torch.Tensor, target: torch.Tensor):
    def step() -> None:
        logits.grad = None
        loss_fn(logits, target).backward()
    return step


def _check_reference(num_classes: int) -> None:
    """The released-code reference equals RecallLoss(official_compat=True): value and gradient."""
    x, t = make_inputs((2, num_classes, 24, 40), seed=1)
    ref = released_recall_loss(x, t, num_classes)
    (g_ref,) = torch.autograd.grad(ref, x)
    ours = build_loss("recall", num_classes, official_compat=True)(x, t)
    (g_ours,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-9)


def run(quick: bool = False) -> list[Row]:
    shape = (2, 19, 128, 256) if quick else (8, 19, 512, 1024)
    repeats = 4 if quick else 5
    c = shape[1]
    _check_reference(c)
    logits, target = make_inputs(shape)
    label = "x".join(map(str, shape))

    def ce(x, t):
        return F.cross_entropy(x, t, ignore_index=IGNORE)

    variants = {
        "recall": build_loss("recall", c),
        "recall ema=0.5": build_loss("recall", c, ema=0.5),
        "recall official_compat": build_loss("recall", c, official_compat=True),
        "recall_focal gamma=1": build_loss("recall_focal", c),
    }
    targets = {"recall": 1.15, "recall ema=0.5": 1.2, "recall official_compat": 1.2,
               "recall_focal gamma=1": None}
    rows: list[Row] = []
    for name, loss_fn in variants.items():
        times = interleaved({"ce": _fwd_bwd(ce, logits, target), name: _fwd_bwd(loss_fn, logits, target)},
                            repeats=repeats, warmup=1)
        rows.append(ratio_row(f"{name} fwd+bwd {label} vs F.cross_entropy", times, name, "ce", targets[name]))

    ours = build_loss("recall", c, official_compat=True)
    ref_repeats = 3 if quick else 4
    times = interleaved({"released": _fwd_bwd(lambda x, t: released_recall_loss(x, t, c), logits, target),
                         "ours": _fwd_bwd(ours, logits, target)}, repeats=ref_repeats, warmup=1)
    row = ratio_row(f"recall (official_compat) vs released-code recall {label}: speed-up", times, "ours",
                    "released", None, higher_is_better=True)
    row.target = "ours faster"
    row.met = "yes" if row.ratio and float(row.ratio.split("x")[0]) > 1.0 else "NO"
    rows.append(row)
    return rows

"""The loss library of the study.

``build_loss(name, num_classes, ignore_index=255, **params)`` returns an ``nn.Module`` called as
``loss(logits[N,C,H,W], target[N,H,W] int64) -> scalar``. Every loss computes in float32 (autocast
off inside), ignores ``ignore_index`` pixels, and returns a graph-attached 0 for a batch whose pixels
are all ignored. ``LOSS_TABLE`` (name -> (what, notes)) is the one-line description of each loss.
"""

from __future__ import annotations

import inspect

from torch import nn

from .abl import ActiveBoundaryLoss
from .auto_seg import AutoSegLoss
from .ce import ClassBalancedCrossEntropy, CrossEntropy, WeightedCrossEntropy
from .dice import DiceLoss
from .focal import FocalLoss
from .lovasz import LovaszSoftmaxLoss
from .ohem import OhemCrossEntropy
from .recall import RecallFocalLoss, RecallLoss
from .semeda import SemedaLoss
from .soft_iou import SoftIoULoss
from .ssl import StructuralSimilarityLoss

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "weighted_ce": WeightedCrossEntropy,
    "class_balanced": ClassBalancedCrossEntropy,
    "focal": FocalLoss,
    "lovasz": LovaszSoftmaxLoss,
    "soft_iou": SoftIoULoss,
    "dice": DiceLoss,
    "ohem": OhemCrossEntropy,
    "recall": RecallLoss,
    "recall_focal": RecallFocalLoss,
    "abl": ActiveBoundaryLoss,
    "ssl": StructuralSimilarityLoss,
    "auto_seg": AutoSegLoss,
    "semeda": SemedaLoss,
}

LOSS_TABLE: dict[str, tuple[str, str]] = {
    "ce": ("cross entropy", "mean over valid pixels"),
    "weighted_ce": ("class-weighted CE",
                    "`scheme: median` (median-frequency, Eigen & Fergus) or `inverse`; takes `class_counts`"),
    "class_balanced": ("class-balanced CE (effective number, Cui et al.)",
                       "`beta` (default (N-1)/N over total pixels); `class_counts`; weights sum to C"),
    "focal": ("per-pixel softmax focal loss", "`gamma` (default 2), optional `alpha` per class"),
    "lovasz": ("Lovász-softmax", "present classes, batch-wide or `per_image`"),
    "soft_iou": ("soft Jaccard", "per image and class, as in the study (1 - mean over images and classes)"),
    "dice": ("soft Dice", "over the batch, mean over present classes; `smooth` (default 0)"),
    "ohem": ("online hard example mining CE",
             "probability `thresh` (0.7) with `min_kept`; `official_compat` = released top-k along width"),
    "recall": ("recall loss", "weights FN_c/GT_c of the batch, no gradient; `ema`, `official_compat`"),
    "recall_focal": ("focal-modulated recall loss", "`gamma` (default 1); `ema`, `official_compat`"),
    "abl": ("CE + active boundary loss (Wang et al., AAAI 2022)",
            "`weight` (default 1), `max_boundary_fraction` 0.01, `label_smoothing` 0.2, `max_distance` 20; "
            "distance transform on the host (scipy)"),
    "ssl": ("structural similarity loss (Zhao et al., 2019)",
            "gamma*CE + (1-gamma)*sum f e CE / sum f; `gamma` 0.5, `beta` 0.1, `sigma_window` 1.5; e detached"),
    "auto_seg": ("Auto Seg-Loss metric surrogate (Li et al., ICLR 2021)",
                 "`metric` miou|macc, `params` miou_searched|macc_searched|identity|explicit Bezier numbers"),
    "semeda": ("CE + SEMEDA edge-feature matching (Chen et al., 2020)",
               "`weight` 1, `distance` l1|l2; frozen edge net from `edge_net_path` or trained on synthetic "
               "blobs and cached (`cache_dir`, env STUDY_CACHE)"),
}

NEEDS_CLASS_COUNTS: frozenset[str] = frozenset({"weighted_ce", "class_balanced"})
RECALL_FAMILY: frozenset[str] = frozenset({"recall", "recall_focal"})

_BUILDER_ARGS = ("self", "num_classes", "ignore_index")


def loss_params(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters a loss accepts through ``**params`` (name -> inspect.Parameter)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    sig = inspect.signature(LOSSES[name].__init__)
    return {k: p for k, p in sig.parameters.items() if k not in _BUILDER_ARGS}


def build_loss(name: str, num_classes: int, ignore_index: int = 255, **params) -> nn.Module:
    """Instantiate loss ``name``; unknown names, unknown or missing parameters raise ``ValueError``."""
    accepted = loss_params(name)
    valid = sorted(accepted)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown parameter(s) {unknown}; valid parameters: {valid}")
    missing = sorted(k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in params)
    if missing:
        raise ValueError(f"loss {name!r} requires parameter(s) {missing}; valid parameters: {valid}")
    try:
        return LOSSES[name](num_classes=num_classes, ignore_index=ignore_index, **params)
    except TypeError as err:  # e.g. a value of the wrong type reaching arithmetic
        raise ValueError(f"loss {name!r}: invalid parameter value ({err}); valid parameters: {valid}") from err


__all__ = ["LOSSES", "LOSS_TABLE", "NEEDS_CLASS_COUNTS", "RECALL_FAMILY", "build_loss", "loss_params"]

"""The loss library of the study: one :class:`~study.components.Component` entry per loss.

``build_loss(name, num_classes, ignore_index=255, **params)`` returns an ``nn.Module`` called as
``loss(logits[N,C,H,W], target[N,H,W] int64, **needs) -> scalar``. Every loss computes in float32
(autocast off inside), ignores ``ignore_index`` pixels, and returns a graph-attached 0 for a batch
whose pixels are all ignored.

A loss's settings are its constructor's keyword parameters (the signature is the schema); what it
needs from the run is declared on its entry (``needs``: ``class_counts`` is passed to the
constructor, ``image``/``features`` to the call). Constructor validation raises ``ValueError`` whose
message starts with the parameter's name; :func:`check_loss` runs it once when a spec loads, so a
value the loss refuses is refused before any job starts. Adding a loss = one module + one entry here.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping

from torch import nn

from study.components import Component, SettingError

from .abl import ActiveBoundaryLoss
from .auto_seg import AutoSegLoss
from .ce import ClassBalancedCrossEntropy, CrossEntropy, WeightedCrossEntropy
from .dense_crf import DenseCRFLoss
from .dfr import DynamicFeatureRegularizedLoss
from .dice import DiceLoss
from .focal import FocalLoss
from .lovasz import LovaszSoftmaxLoss
from .ohem import OhemCrossEntropy
from .recall import RecallFocalLoss, RecallLoss
from .semeda import SemedaLoss
from .soft_iou import SoftIoULoss
from .ssl import StructuralSimilarityLoss

_RUN_ARGS = ("num_classes", "ignore_index", "class_counts")


def _entry(name: str, cls: type[nn.Module], what: str, notes: str, needs: tuple[str, ...] = (),
           supplied: tuple[str, ...] = (), **extra: Any):
    return Component(name=name, build=cls, supplied=_RUN_ARGS + supplied, needs=frozenset(needs), what=what,
                     notes=notes, extra=extra)


#: name -> entry. ``extra``: ``tracks_weights`` (logs ``last_weights`` as recall_weight/* curves),
#: ``build_at_check`` (False where constructing is expensive, e.g. trains a network), ``non_identity``
#: (settings that say where things are kept, not what is computed: left out of the hash and the label),
#: ``label_free_term`` (a regularizer over all pixels: an all-ignored batch still has a loss).
LOSSES: dict[str, Component] = {e.name: e for e in (
    _entry("ce", CrossEntropy, "cross entropy", "mean over valid pixels"),
    _entry("weighted_ce", WeightedCrossEntropy, "class-weighted CE",
           "`scheme: median` (median-frequency, Eigen & Fergus) or `inverse`; takes `class_counts`",
           needs=("class_counts",)),
    _entry("class_balanced", ClassBalancedCrossEntropy, "class-balanced CE (effective number, Cui et al.)",
           "`beta` (default (N-1)/N over total pixels); `class_counts`; weights sum to C", needs=("class_counts",)),
    _entry("focal", FocalLoss, "per-pixel softmax focal loss", "`gamma` (default 2), optional `alpha` per class; `official_compat`: the factor on the batch-mean CE"),
    _entry("lovasz", LovaszSoftmaxLoss, "Lovász-softmax", "present classes, batch-wide or `per_image`"),
    _entry("soft_iou", SoftIoULoss, "soft Jaccard",
           "per image and class, as in the study (1 - mean over images and classes)"),
    _entry("dice", DiceLoss, "soft Dice", "over the batch, mean over present classes; `smooth` (default 0)"),
    _entry("ohem", OhemCrossEntropy, "online hard example mining CE",
           "probability `thresh` (0.7) with `min_kept`; `official_compat` = released top-k along width"),
    _entry("recall", RecallLoss, "recall loss",
           "weights FN_c/GT_c of the batch, no gradient; `ema` (`ema_start` ones or first_batch), `official_compat`", tracks_weights=True),
    _entry("recall_focal", RecallFocalLoss, "focal-modulated recall loss",
           "`gamma` (default 1); `ema`, `official_compat`", tracks_weights=True),
    _entry("abl", ActiveBoundaryLoss, "CE + active boundary loss (Wang et al., AAAI 2022)",
           "`weight` (default 1), `max_boundary_fraction` 0.01, `label_smoothing` 0.2, `max_distance` 20; "
           "distance transform on the host (scipy); `official_compat`: the released integer distance map"),
    _entry("ssl", StructuralSimilarityLoss, "structural similarity loss (Zhao et al., 2019)",
           "gamma*CE + (1-gamma)*sum f e CE / M, M and e_max over all classes (Jadon 2020's transcription); "
           "`gamma` 0.5, `beta` 0.1, `sigma_window` 1.5; e detached"),
    _entry("auto_seg", AutoSegLoss, "Auto Seg-Loss metric surrogate (Li et al., ICLR 2021)",
           "`metric` miou or macc, `params` miou_searched or macc_searched or identity or explicit Bezier numbers; "
           "mean over all C classes (official) or `reduction: present_classes`"),
    _entry("semeda", SemedaLoss, "CE + SEMEDA edge-feature matching (Chen et al., 2020)",
           "`weight` 1, `distance` l1 or l2; frozen edge net trained on the training masks (`edge_net: "
           "train_masks`, cached by their digest, logged to the run), on synthetic `blobs`, or from `edge_net_path`",
           needs=("train_masks",), supplied=("train_masks",), build_at_check=False, non_identity=("cache_dir",)),
    _entry("dense_crf", DenseCRFLoss, "partial CE + DenseCRF regularized loss (Tang et al., ECCV 2018)",
           "scribble supervision; `weight` 2e-9, `sigma_rgb` 15, `sigma_xy` 100, `scale` 0.5; exact dense kernel "
           "up to `exact_max_pixels`, downscaled beyond", needs=("image",), label_free_term=True),
    _entry("dfr", DynamicFeatureRegularizedLoss, "partial CE + dynamic feature regularized loss (Zhang et al., 2021)",
           "shallow (RGB, XY) + deep feature kernel, feature consistency head trained with the model; "
           "`deep_weight`, `sigma_deep`, `consistency_weight`", needs=("image", "features"),
           supplied=("feature_channels",), label_free_term=True),
)}


def loss_entry(name: str) -> Component:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name]


def loss_params(name: str):
    """Settings a loss accepts (name -> inspect.Parameter), in signature order."""
    return loss_entry(name).parameters()


def _setting_error(name: str, params: Mapping[str, Any], err: Exception) -> SettingError:
    """A constructor's ValueError as a SettingError on the parameter its message starts with."""
    text = str(err)
    key = next((k for k in sorted(params, key=len, reverse=True) if text.startswith(k)), None)
    if key is None:
        return SettingError("params", f"loss {name!r} refused its settings: {text}")
    what = text[len(key):].lstrip(" :=")
    return SettingError(f"params.{key}", f"{params[key]!r} is not allowed: {what}")


@functools.lru_cache(maxsize=4096)
def _check_cached(name: str, params_json: str, num_classes: int) -> None:
    params = json.loads(params_json)
    kwargs = dict(params)
    if "class_counts" in LOSSES[name].needs:
        kwargs["class_counts"] = [1] * num_classes
    try:
        LOSSES[name].build(num_classes=num_classes, ignore_index=255, **kwargs)
    except (ValueError, TypeError) as err:
        raise _setting_error(name, params, err) from None


def check_loss(name: str, params: Mapping[str, Any], num_classes: int) -> None:
    """Run the loss's own validation on resolved ``params`` (SettingError keyed ``params.<name>``)."""
    if LOSSES[name].extra.get("build_at_check", True):
        _check_cached(name, json.dumps(params, sort_keys=True), num_classes)


def build_loss(name: str, num_classes: int, ignore_index: int = 255, **params) -> nn.Module:
    """Instantiate loss ``name``; unknown names, unknown or missing parameters raise ``ValueError``."""
    entry = loss_entry(name)
    accepted = entry.parameters()
    counts = params.pop("class_counts", None)
    supplied = {k: params.pop(k) for k in entry.supplied if k in params and k not in _RUN_ARGS}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown parameter(s) {unknown}; valid parameters: {sorted(accepted)}")
    if "class_counts" in entry.needs:
        if counts is None:
            raise ValueError(f"loss {name!r} requires parameter(s) ['class_counts']; "
                             f"valid parameters: {sorted(accepted)}")
        params["class_counts"] = counts
    try:
        return entry.build(num_classes=num_classes, ignore_index=ignore_index, **params, **supplied)
    except TypeError as err:  # e.g. a value of the wrong type reaching arithmetic
        raise ValueError(f"loss {name!r}: invalid parameter value ({err}); valid parameters: {sorted(accepted)}") from err


__all__ = ["LOSSES", "build_loss", "check_loss", "loss_entry", "loss_params"]

"""Auto Seg-Loss metric surrogates (Li et al., ICLR 2021) with piecewise quadratic Bezier functions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, one_hot, zero_loss

# The published searched parameters: per curve (x_ctrl1, y_ctrl1, x_end1, y_end1, x_ctrl2, y_ctrl2).
PRESETS: dict[str, dict[str, tuple[float, ...]]] = {
    "macc_searched": {"h": (0.021454, 0.739057, 0.411634, 0.798656, 0.919862, 0.950412)},
    "miou_searched": {"and": (0.000570, 0.643720, 0.338589, 0.705543, 0.625281, 0.779552),
                      "or": (0.690376, 0.013063, 0.834171, 0.962432, 0.942998, 0.980038)},
    "identity": {"h": (0.25, 0.25, 0.5, 0.5, 0.75, 0.75),
                 "and": (0.25, 0.25, 0.5, 0.5, 0.75, 0.75), "or": (0.25, 0.25, 0.5, 0.5, 0.75, 0.75)},
}
METRICS: dict[str, tuple[str, ...]] = {"miou": ("and", "or"), "macc": ("h",)}
REDUCTIONS = ("all_classes", "present_classes")


def check_curve(params: Sequence[float], what: str = "params") -> tuple[float, ...]:
    """Validate the 6 numbers of a 2-piece curve from (0,0) through (x_end1, y_end1) to (1,1): every value in
    [0, 1], x strictly increasing from each segment's start through its control point to its end (so x(t) is
    invertible), y non-decreasing likewise (so h is monotone)."""
    try:
        vals = tuple(float(v) for v in params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be 6 numbers, got {params!r}") from err
    if len(vals) != 6 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"{what} must be 6 numbers in [0, 1], got {params!r}")
    xc1, yc1, xe1, ye1, xc2, yc2 = vals
    if not 0.0 < xc1 < xe1 < xc2 < 1.0:
        raise ValueError(f"{what}: need 0 < x_ctrl1 < x_end1 < x_ctrl2 < 1, got {params!r}")
    if not 0.0 <= yc1 <= ye1 <= yc2 <= 1.0:
        raise ValueError(f"{what}: need 0 <= y_ctrl1 <= y_end1 <= y_ctrl2 <= 1 (monotone), got {params!r}")
    return vals


class _BezierH(torch.autograd.Function):
    """h(x) of ``bezier_h``; backward multiplies by dh/dx = y'(t) / x'(t), x'(t) = b + 2 a t = sqrt(b^2 + 4 a u)
    (0 outside [0, 1]). One fused pass instead of an autograd graph of ~20 element-wise ops."""

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple[float, ...]):  # type: ignore[override]
        xc1, yc1, xe1, ye1, xc2, yc2 = params
        first = x <= xe1

        def pick(v1: float, v2: float) -> Tensor:
            return torch.where(first, torch.tensor(v1, dtype=x.dtype, device=x.device),
                               torch.tensor(v2, dtype=x.dtype, device=x.device))

        x0, x1, x2 = pick(0.0, xe1), pick(xc1, xc2), pick(xe1, 1.0)
        y0, y1, y2 = pick(0.0, ye1), pick(yc1, yc2), pick(ye1, 1.0)
        a, b = x0 - 2.0 * x1 + x2, 2.0 * (x1 - x0)
        inside = (x >= 0.0) & (x <= 1.0)
        u = torch.minimum((x - x0).clamp_min(0.0), x2 - x0)
        root = (b * b + 4.0 * a * u).clamp_min(0.0).sqrt()
        t = (2.0 * u / (b + root)).clamp(0.0, 1.0)
        y = (1.0 - t) ** 2 * y0 + 2.0 * t * (1.0 - t) * y1 + t * t * y2
        dy_dt = 2.0 * (1.0 - t) * (y1 - y0) + 2.0 * t * (y2 - y1)
        slope = torch.where(inside, dy_dt / (b + 2.0 * a * t).clamp_min(1e-12), torch.zeros_like(x))
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def bezier_h(x: Tensor, params: Sequence[float]) -> Tensor:
    """h(x) for x in [0, 1] (x clamped): the piecewise quadratic Bezier (0,0)-(xc1,yc1)-(xe1,ye1), then
    (xe1,ye1)-(xc2,yc2)-(1,1); monotone, h(0) = 0, h(1) = 1. ``params`` as validated by ``check_curve``.

    On the segment P0-P1-P2 holding x: x(t) = x0 + b t + a t^2 with b = 2 (x1 - x0) > 0, a = x0 - 2 x1 + x2;
    its root in [0, 1] is t = 2u / (b + sqrt(b^2 + 4 a u)), u = x - x0 (the stable form of the quadratic
    formula; b^2 + 4au >= 0 on the segment: linear in u, it equals 4 (x2 - x1)^2 at the segment's end);
    then h = (1-t)^2 y0 + 2t(1-t) y1 + t^2 y2.
    """
    return _BezierH.apply(x, tuple(float(v) for v in params))


def resolve_curves(metric: str, params: str | Sequence[float] | Mapping[str, Sequence[float]] | None
                   ) -> dict[str, tuple[float, ...]]:
    """The curves a metric needs (``miou``: "and", "or"; ``macc``: "h"), from a preset name, a mapping with
    those keys, or a flat list (6 numbers for macc; 12 = and + or for miou)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    keys = METRICS[metric]
    if params is None:
        params = f"{metric}_searched"
    if isinstance(params, str):
        if params not in PRESETS:
            raise ValueError(f"params must be one of {sorted(PRESETS)} or explicit numbers, got {params!r}")
        if not set(keys) <= set(PRESETS[params]):
            raise ValueError(f"params preset {params!r} has no curve(s) {list(keys)} for metric {metric!r}")
        raw: Mapping[str, Sequence[float]] = PRESETS[params]
    elif isinstance(params, Mapping):
        if set(params) != set(keys):
            raise ValueError(f"params for metric {metric!r} must have the keys {list(keys)}, got {sorted(params)}")
        raw = params
    else:
        flat = list(params)
        if len(flat) != 6 * len(keys):
            raise ValueError(f"params for metric {metric!r} must be {6 * len(keys)} numbers "
                             f"({' + '.join(keys)}), got {len(flat)}")
        raw = {k: flat[6 * i:6 * i + 6] for i, k in enumerate(keys)}
    return {k: check_curve(raw[k], f"params[{k!r}]") for k in keys}


class AutoSegLoss(SegLoss):
    """Auto Seg-Loss surrogate of mIoU or mAcc (Li et al., "Auto Seg-Loss: Searching Metric Surrogates for
    Semantic Segmentation", ICLR 2021), over the valid pixels of the batch, p = softmax(x), y = one-hot:

        miou: s_c = I_c / U_c,  I_c = sum h_and(p_c) y_c,  U_c = sum (h_or(p_c) + y_c - h_or(p_c) y_c)
        macc: s_c = sum h(p_c) y_c / sum y_c
        L = 1 - (1/C) sum_{c=1..C} s_c                      (reduction="all_classes", the default)
        L = 1 - (1/|P|) sum_{c in P} s_c                    (reduction="present_classes")

    "all_classes" is the official implementation's reduction (its ``forward_mIoU`` / ``forward_mAcc``
    take the mean of the per-class scores over all C classes): a class without GT pixels in the batch
    has I_c = 0, so s_c = 0 with zero gradient and it adds the constant 1/C to L. "present_classes"
    averages over P = classes with GT pixels in the batch, which scales every gradient by C/|P|.
    The official code adds 1e-8 to the denominators; here they are clamped (U_c >= 1e-12,
    sum y_c >= 1), identical whenever a class is present. A batch without valid pixels gives 0.

    h: [0,1] -> [0,1] is a 2-piece quadratic Bezier curve from (0,0) to (1,1) (``bezier_h``).
    ``params``: ``"miou_searched"`` / ``"macc_searched"`` (the published search results; default: the one of
    ``metric``), ``"identity"`` (h(x) = x), or explicit numbers (a mapping ``{and: [6], or: [6]}`` / ``{h: [6]}``
    or a flat list of 12 / 6). ``ce_weight`` adds ce_weight * CE (default 0: the surrogate alone, as searched).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, metric: Literal["miou", "macc"] = "miou",
                 params: str | Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                 ce_weight: float = 0.0,
                 reduction: Literal["all_classes", "present_classes"] = "all_classes") -> None:
        super().__init__(num_classes, ignore_index)
        self.metric = metric
        self.curves = resolve_curves(metric, params)
        self.params = params if params is None or isinstance(params, str) else "explicit"
        if not ce_weight >= 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight!r}")
        self.ce_weight = float(ce_weight)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: {reduction!r} is not allowed (allowed: {list(REDUCTIONS)})")
        self.reduction = reduction

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        c = self.num_classes
        t_ext = extended_target(target, c, self.ignore_index)
        valid = (t_ext < c).unsqueeze(1).to(x.dtype)
        logp = x.log_softmax(1)
        p = logp.exp().clamp(0.0, 1.0)
        y = one_hot(t_ext, c, x.dtype)
        dims = (0, 2, 3)
        gt = y.sum(dims)
        if self.metric == "miou":
            h_and = bezier_h(p, self.curves["and"]) * valid
            h_or = bezier_h(p, self.curves["or"]) * valid
            inter = (h_and * y).sum(dims)
            union = (h_or + y - h_or * y).sum(dims)
            score = inter / union.clamp_min(1e-12)
        else:
            score = (bezier_h(p, self.curves["h"]) * y).sum(dims) / gt.clamp_min(1.0)
        present = (gt > 0).to(x.dtype)
        if self.reduction == "all_classes":
            loss = 1.0 - (score * present).sum() / c
        else:
            loss = ((1.0 - score) * present).sum() / present.sum().clamp_min(1.0)
        if self.ce_weight > 0:
            nll = -(logp * y).sum(1)
            loss = loss + self.ce_weight * nll.sum() / valid.sum().clamp_min(1.0)
        return torch.where(present.sum() > 0, loss, zero_loss(x))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, metric={self.metric!r}, params={self.params!r}, ce_weight={self.ce_weight}, "
                f"reduction={self.reduction!r}")

"""Softmax focal loss (Lin et al. 2017, Eq. 5, per pixel) and the released code's batch-level form."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, masked_mean, pixel_cross_entropy


def focal_factor(ce: Tensor, gamma: float, floor: float = 0.0) -> Tensor:
    """(1 - exp(-ce))^gamma, as -expm1(-ce) (accurate near ce = 0; the clamp at ``floor`` >= 0
    guards against a rounding-negative CE, and a positive ``floor`` keeps the gradient finite at
    ce = 0 when gamma < 1)."""
    return (-torch.expm1(-ce)).clamp_min(floor).pow(gamma)


class FocalLoss(SegLoss):
    """Per pixel (default), Lin et al. 2017 Eq. 5 with p_n = softmax(x_n)_{y_n} = exp(-CE_n):

        L = (1/|V|) sum_{n in V} alpha_{y_n} (1 - p_n)^gamma CE_n          (V: valid pixels)

    ``alpha``: optional per-class weights (length C, default all 1); the mean is over valid pixels,
    not divided by the alphas.

    ``official_compat=True``: the released code's form (its ``FocalLoss``), the focal factor applied
    once to the batch-mean CE:

        ce = sum_{n in V} alpha_{y_n} CE_n / sum_{n in V} alpha_{y_n}     (plain mean without alpha)
        L  = (1 - exp(-ce))^gamma * ce

    with ``alpha`` in the role of the released loss's CE class ``weight`` (torch's weighted mean).
    The study ran it with gamma = 1; the default gamma here stays 2 (Lin et al.).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, gamma: float = 2.0,
                 alpha: Sequence[float] | None = None, official_compat: bool = False) -> None:
        super().__init__(num_classes, ignore_index)
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: {gamma!r} is not allowed (allowed: a finite number >= 0)")
        self.gamma = float(gamma)
        if alpha is not None:
            alpha_t = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
            if alpha_t.numel() != num_classes:
                raise ValueError(f"alpha must have num_classes={num_classes} entries, got {alpha_t.numel()}")
            self.register_buffer("alpha", alpha_t)
        else:
            self.alpha = None
        self.official_compat = bool(official_compat)

    def pixel_weights(self, x: Tensor, target: Tensor) -> Tensor:
        """alpha_{y_n} at valid pixels (1 without alpha), 0 at ignored ones."""
        if self.alpha is None:
            return (target != self.ignore_index).to(x.dtype)
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        a_ext = torch.cat([self.alpha.to(device=x.device, dtype=x.dtype), x.new_zeros(1)])
        return a_ext[t_ext]

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        weights = self.pixel_weights(x, target)
        if self.official_compat:
            ce = masked_mean(nll * weights, weights)
            return focal_factor(ce, self.gamma, floor=torch.finfo(ce.dtype).tiny) * ce
        valid = (target != self.ignore_index).to(x.dtype)
        return masked_mean(focal_factor(nll, self.gamma) * nll * weights, valid)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, official_compat={self.official_compat}"

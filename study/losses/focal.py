"""Per-pixel softmax focal loss (Lin et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, masked_mean, pixel_cross_entropy


class FocalLoss(SegLoss):
    """L = (1/|V|) sum_{n in V} alpha_{y_n} (1 - p_n)^gamma CE_n, with p_n = softmax(x_n)_{y_n} = exp(-CE_n).

    ``alpha``: optional per-class weights (length C, default all 1); the mean is over valid pixels,
    not divided by the alphas. Unlike the released code, the modulation is per pixel.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, gamma: float = 2.0,
                 alpha: Sequence[float] | None = None) -> None:
        super().__init__(num_classes, ignore_index)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        if alpha is not None:
            alpha_t = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
            if alpha_t.numel() != num_classes:
                raise ValueError(f"alpha must have num_classes={num_classes} entries, got {alpha_t.numel()}")
            self.register_buffer("alpha", alpha_t)
        else:
            self.alpha = None

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        valid = (target != self.ignore_index).to(x.dtype)
        # 1 - exp(-CE) = -expm1(-CE); clamp guards against a rounding-negative CE
        modulating = (-torch.expm1(-nll)).clamp_min(0).pow(self.gamma)
        per_pixel = modulating * nll
        if self.alpha is not None:
            t_ext = extended_target(target, self.num_classes, self.ignore_index)
            a_ext = torch.cat([self.alpha.to(device=x.device, dtype=x.dtype), x.new_zeros(1)])
            per_pixel = per_pixel * a_ext[t_ext]
        return masked_mean(per_pixel, valid)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"

"""Recall loss (Tian et al., ICRA 2022) and its focal-modulated variant."""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import SegLoss, cross_entropy_with_max, extended_target, recall_counts, safe_target


class RecallLoss(SegLoss):
    """Recall-weighted CE with weights from the current batch.

    Over the valid pixels V of the batch, with predictions argmax_c x_nc:
        FN_c = #{n in V: y_n = c, prediction != c},  GT_c = #{n in V: y_n = c}
        w_c  = FN_c / GT_c  (= 1 - recall_c; 0 when GT_c = 0, hence also 0 when FN_c = 0)
        L    = (1/|V|) sum_{n in V} w_{y_n} CE_n         (w without gradient)
    A pixel counts as a false negative when max_c x_nc > x_{n,y_n}; this equals argmax != y except
    for exact ties with the target logit (counted as correct).

    ema=alpha: w_c <- alpha * FN_c/GT_c + (1 - alpha) * w_c for classes present in the batch only
    (the authors' development code's update), starting from w = 1 (plain CE). The development code
    instead started from the first batch's raw ratio (its counter arithmetic, as under
    ``official_compat``) and applied the update from the second batch on; here the first batch
    already mixes its ratio with the initial ones. The weights live in the buffer ``ema_weights``
    (saved in ``state_dict``) and the updated weights are the ones applied. The buffer is updated
    only in training mode; in eval mode the would-be update is used but not stored.

    official_compat=True: the released arithmetic: per-class counters start at 1 and are overwritten
    by the counts of classes that occur, so w_c = FN_c/GT_c when FN_c > 0, 1/GT_c when FN_c = 0 < GT_c,
    1 for a class absent from the batch; L = (1/(N H W)) sum over all pixels, ignored ones adding 0
    (ignored pixels are left out of the counts instead of crashing).

    After every call ``last_weights`` holds the weights applied (detached ``[C]``, logits' device).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, ema: float | None = None,
                 official_compat: bool = False) -> None:
        super().__init__(num_classes, ignore_index)
        if ema is not None and not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be None or in (0, 1], got {ema!r}")
        self.ema = None if ema is None else float(ema)
        self.official_compat = bool(official_compat)
        if self.ema is not None:
            self.register_buffer("ema_weights", torch.ones(num_classes))
        self.last_weights: Tensor | None = None

    def batch_weights(self, fn: Tensor, gt: Tensor, dtype: torch.dtype) -> Tensor:
        """Weights applied to this batch (updates the EMA buffer in training mode)."""
        fn, gt = fn.to(dtype), gt.to(dtype)
        if self.official_compat:
            ratio = torch.where(fn > 0, fn, 1.0) / torch.where(gt > 0, gt, 1.0)
        else:
            ratio = fn / gt.clamp_min(1)
        if self.ema is None:
            return ratio
        old = self.ema_weights
        if old.device != fn.device:
            self.ema_weights = old = old.to(fn.device)
        new = torch.where(gt > 0, self.ema * ratio + (1.0 - self.ema) * old.to(dtype), old.to(dtype))
        if self.training:
            self.ema_weights.copy_(new.detach())
        return new

    def pixel_loss(self, nll: Tensor, w_pix: Tensor) -> Tensor:
        """Per-pixel loss before the reduction (``w_pix`` is 0 at ignored pixels)."""
        return w_pix * nll

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        c = self.num_classes
        t_ext = extended_target(target, c, self.ignore_index)
        nll, x_max, x_y = cross_entropy_with_max(x, safe_target(t_ext, c))
        fn, gt = recall_counts(x_max, x_y, t_ext, c)
        weights = self.batch_weights(fn, gt, x.dtype).detach()
        self.last_weights = weights
        w_pix = torch.cat([weights, weights.new_zeros(1)])[t_ext]
        total = self.pixel_loss(nll, w_pix).sum()
        if self.official_compat:
            return total / target.numel()
        n_valid = gt.sum()
        return total / torch.where(n_valid > 0, n_valid, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ema={self.ema}, official_compat={self.official_compat}"


class RecallFocalLoss(RecallLoss):
    """Focal-modulated recall loss (the authors' development code), gamma = 1 by default:

        per pixel  l_n = (1 - p_n)^gamma * w_{y_n} * CE_n,   p_n = exp(-CE_n),

    with the recall weights w, the ``ema`` option and the reductions of :class:`RecallLoss`.

    Default: the focal factor carries gradient (Lin et al.'s focal loss times the recall weight),
    L = (1/|V|) sum_{n in V} l_n.

    ``official_compat=True``: the development code's arithmetic: p_n is detached (the factor
    (1 - p_n)^gamma is a constant weight, as w), the weights are the released counter arithmetic of
    :class:`RecallLoss` and the reduction is its plain mean over all N*H*W pixels (ignored pixels
    add 0): L = (1/(N H W)) sum_{n in V} (1 - p_n)^gamma w_{y_n} CE_n.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, gamma: float = 1.0,
                 ema: float | None = None, official_compat: bool = False) -> None:
        super().__init__(num_classes, ignore_index, ema=ema, official_compat=official_compat)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    def pixel_loss(self, nll: Tensor, w_pix: Tensor) -> Tensor:
        ce_for_factor = nll.detach() if self.official_compat else nll
        modulating = (-torch.expm1(-ce_for_factor)).clamp_min(0).pow(self.gamma)
        return modulating * w_pix * nll

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"

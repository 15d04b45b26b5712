"""Recall loss (Tian et al., ICRA 2022) and its focal-modulated variant."""

from __future__ import annotations

from typing import Literal

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
    (the authors' development code's update). ``ema_start`` says where the average starts:
    ``"ones"`` (default): from w = 1 (plain CE), so the first batch already mixes its ratio with the
    ones; ``"first_batch"``: as the development code, the first training batch's ratio is taken as
    is (classes absent from it keep 1) and the update applies from the second batch on. The weights
    live in the buffer ``ema_weights`` (saved in ``state_dict``, with ``ema_started``) and the updated
    weights are the ones applied. The buffers are updated only in training mode; in eval mode the
    would-be update is used but not stored.

    official_compat=True: the released arithmetic: per-class counters start at 1 and are overwritten
    by the counts of classes that occur, so w_c = FN_c/GT_c when FN_c > 0, 1/GT_c when FN_c = 0 < GT_c,
    1 for a class absent from the batch; L = (1/(N H W)) sum over all pixels, ignored ones adding 0
    (ignored pixels are left out of the counts instead of crashing).

    After every call ``last_weights`` holds the weights applied (detached ``[C]``, logits' device).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, ema: float | None = None,
                 official_compat: bool = False, ema_start: Literal["ones", "first_batch"] = "ones") -> None:
        super().__init__(num_classes, ignore_index)
        if ema is not None and not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be None or in (0, 1], got {ema!r}")
        if ema_start not in ("ones", "first_batch"):
            raise ValueError(f"ema_start must be 'ones' or 'first_batch', got {ema_start!r}")
        if ema is None and ema_start != "ones":
            raise ValueError("ema_start: 'first_batch' needs an `ema` factor")
        self.ema = None if ema is None else float(ema)
        self.ema_start = ema_start
        self.official_compat = bool(official_compat)
        if self.ema is not None:
            self.register_buffer("ema_weights", torch.ones(num_classes))
            self.register_buffer("ema_started", torch.tensor(ema_start == "ones"))
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
            self.ema_started = self.ema_started.to(fn.device)
        # "first_batch": the first training batch's ratio is taken as is (alpha 1); no host sync
        alpha = torch.where(self.ema_started, self.ema, 1.0).to(dtype)
        new = torch.where(gt > 0, alpha * ratio + (1.0 - alpha) * old.to(dtype), old.to(dtype))
        if self.training:
            self.ema_weights.copy_(new.detach())
            self.ema_started.fill_(True)
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before ``ema_start`` existed have weights but no flag: they had started
        if self.ema is not None and prefix + "ema_weights" in state_dict:
            state_dict.setdefault(prefix + "ema_started", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        return (f"{super().extra_repr()}, ema={self.ema}, ema_start={self.ema_start!r}, "
                f"official_compat={self.official_compat}")


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
                 ema: float | None = None, official_compat: bool = False,
                 ema_start: Literal["ones", "first_batch"] = "ones") -> None:
        super().__init__(num_classes, ignore_index, ema=ema, official_compat=official_compat, ema_start=ema_start)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    def pixel_loss(self, nll: Tensor, w_pix: Tensor) -> Tensor:
        ce_for_factor = nll.detach() if self.official_compat else nll
        modulating = (-torch.expm1(-ce_for_factor)).clamp_min(0).pow(self.gamma)
        return modulating * w_pix * nll

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"

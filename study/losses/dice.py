"""Soft Dice loss over the batch, classes present in the target."""

from __future__ import annotations

from torch import Tensor

from ._functional import SegLoss, extended_target, one_hot


class DiceLoss(SegLoss):
    """L = 1 - mean_{c in P} D_c, D_c = (2 sum_i p_ic y_ic + s) / (sum_i p_ic + sum_i y_ic + s),
    sums over the valid pixels i of the whole batch, p = softmax(x), P = classes with GT pixels in the
    batch, s = ``smooth`` (default 0). A batch without valid pixels gives a graph-attached 0.
    (smp's ``DiceLoss`` zeroes absent classes but averages over all C: it equals this times |P|/C.)
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, smooth: float = 0.0) -> None:
        super().__init__(num_classes, ignore_index)
        if not smooth >= 0:
            raise ValueError(f"smooth must be >= 0, got {smooth!r}")
        self.smooth = float(smooth)

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        c = x.shape[1]
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        valid = (t_ext < self.num_classes).unsqueeze(1).to(x.dtype)
        p = (x.softmax(dim=1) * valid).transpose(0, 1).reshape(c, -1)
        y = one_hot(t_ext, self.num_classes, x.dtype).transpose(0, 1).reshape(c, -1)
        gt = y.sum(-1)
        inter = (p * y).sum(-1)
        card = p.sum(-1) + gt
        dice = (2.0 * inter + self.smooth) / (card + self.smooth).clamp_min(1e-12)
        present = (gt > 0).to(x.dtype)
        return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, smooth={self.smooth}"

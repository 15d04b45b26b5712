"""Soft Jaccard (soft IoU) loss, per image and class, as the study trains it."""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, one_hot, zero_loss


class SoftIoULoss(SegLoss):
    """L = 1 - (1/(N C)) sum_{n,c} I_nc / (U_nc + eps), over valid pixels i of image n:
    I_nc = sum_i p_ic y_ic,  U_nc = sum_i (p_ic + y_ic - p_ic y_ic),  p = softmax(x), eps = 1e-16.

    The mean runs over every (image, class) pair, absent classes included (their ratio is 0 in value
    and gradient), as the released code averages. Differences from it: ignored pixels are left out of
    U (the released code leaves their predictions in), and the loss is 1 - mean instead of -mean
    (same gradient). A batch without valid pixels gives a graph-attached 0.
    """

    eps = 1e-16

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        n, c = x.shape[:2]
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        valid = (t_ext < self.num_classes).unsqueeze(1).to(x.dtype)
        p = x.softmax(dim=1) * valid
        y = one_hot(t_ext, self.num_classes, x.dtype)
        inter = (p * y).reshape(n, c, -1).sum(-1)
        union = (p + y - p * y).reshape(n, c, -1).sum(-1)
        loss = 1.0 - (inter / (union + self.eps)).mean()
        return torch.where(valid.sum() > 0, loss, zero_loss(x))

"""Lovász-softmax loss (Berman, Triki & Blaschko 2018), classes present in the target."""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, one_hot


def lovasz_softmax(probs: Tensor, target_ext: Tensor, num_classes: int) -> Tensor:
    """Per-group Lovász-softmax. ``probs`` ``[G, C, P]``, ``target_ext`` ``[G, P]`` (ignored = C).

    For each group g and class c with GT pixels: errors e_i = |[y_i = c] - p_ic| over valid pixels,
    sorted decreasingly; loss_gc = sum_i e_(i) * (J(i) - J(i-1)) with J(i) = 1 - |gt \\ top_i| / |gt u top_i|
    the Jaccard loss of the i largest errors (Lovász extension of the Jaccard loss).
    Returns ``[G]``: the mean over present classes of each group, 0 for a group without valid pixels.
    Ignored pixels get sort key -1, land after every valid one and contribute 0.
    """
    valid = (target_ext < num_classes).unsqueeze(1)  # [G,1,P]
    fg = one_hot(target_ext.unsqueeze(-1), num_classes, probs.dtype).squeeze(-1)  # [G,C,P]
    errors = torch.where(valid, (fg - probs).abs(), torch.full_like(probs, -1.0))
    errors_sorted, perm = torch.sort(errors, dim=-1, descending=True)
    fg_sorted = fg.gather(-1, perm)
    gts = fg.sum(-1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(-1)
    union = gts + (1.0 - fg_sorted).cumsum(-1)  # >= 1 everywhere
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)
    per_class = (errors_sorted.clamp_min(0) * grad).sum(-1)  # [G,C]
    present = (gts.squeeze(-1) > 0).to(probs.dtype)
    return (per_class * present).sum(-1) / present.sum(-1).clamp_min(1)


class LovaszSoftmaxLoss(SegLoss):
    """Lovász-softmax on p = softmax(x), averaged over the classes present in the target.

    per_image=False: one Lovász term per class over all valid pixels of the batch.
    per_image=True: the loss of each image (mean over its present classes), averaged over images
    (an image without valid pixels counts as 0, as in the reference implementation).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, per_image: bool = False) -> None:
        super().__init__(num_classes, ignore_index)
        self.per_image = bool(per_image)

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        n, c, h, w = x.shape
        probs = x.softmax(dim=1)
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        if self.per_image:
            return lovasz_softmax(probs.reshape(n, c, h * w), t_ext.reshape(n, h * w), c).mean()
        probs = probs.permute(1, 0, 2, 3).reshape(1, c, n * h * w)
        return lovasz_softmax(probs, t_ext.reshape(1, n * h * w), c)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_image={self.per_image}"

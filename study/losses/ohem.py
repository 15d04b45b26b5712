"""Online hard example mining cross entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import SegLoss, masked_mean, pixel_cross_entropy


class OhemCrossEntropy(SegLoss):
    """OHEM CE over the batch (the PSPNet/HRNet/mmseg rule).

    p_n = softmax(x_n)_{y_n} (no gradient); q = the (k+1)-th smallest p over valid pixels with
    k = min(min_kept, |V| - 1); tau = max(thresh, q); kept K = {n in V : p_n < tau};
    L = (1/|K|) sum_{n in K} CE_n (a graph-attached 0 when K is empty).
    So every valid pixel predicted with p < thresh is kept, and at least about ``min_kept`` of the
    hardest ones (fewer when probabilities tie at q).

    official_compat=True reproduces the released code instead: CE with ignored pixels at 0,
    top-k along the image width with k = int(thresh * N) (N = batch size; clamped to [1, W] so it
    never returns NaN), mean of the kept values; with thresh = 1 the released code skips the top-k
    and returns the plain mean of that CE map over all N*H*W pixels (ignored pixels add 0):
    L = (1/(N H W)) sum_{n in V} CE_n.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, thresh: float = 0.7,
                 min_kept: int = 100_000, official_compat: bool = False) -> None:
        super().__init__(num_classes, ignore_index)
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh must be in (0, 1], got {thresh!r}")
        if not isinstance(min_kept, int) or min_kept < 0:
            raise ValueError(f"min_kept must be a non-negative int, got {min_kept!r}")
        self.thresh = float(thresh)
        self.min_kept = min_kept
        self.official_compat = bool(official_compat)

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        if self.official_compat and self.thresh == 1.0:
            return nll.mean()
        if self.official_compat:
            n, w = x.shape[0], x.shape[-1]
            k = min(max(int(self.thresh * n), 1), w)
            return nll.topk(k, dim=-1).values.mean()
        valid = target != self.ignore_index
        prob = torch.exp(-nll.detach())
        flat = torch.where(valid, prob, torch.full_like(prob, 2.0)).reshape(-1)  # ignored sort last
        k_top = min(self.min_kept + 1, flat.numel())
        smallest = flat.topk(k_top, largest=False, sorted=True).values
        n_valid = valid.sum()
        idx = torch.minimum(n_valid - 1, torch.full_like(n_valid, self.min_kept)).clamp_min(0)
        tau = smallest.gather(0, idx.reshape(1)).clamp_min(self.thresh)
        kept = (valid & (prob < tau)).to(x.dtype)
        return masked_mean(nll * kept, kept)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, thresh={self.thresh}, min_kept={self.min_kept}, "
                f"official_compat={self.official_compat}")

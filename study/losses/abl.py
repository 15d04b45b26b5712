"""Active Boundary Loss (Wang et al., AAAI 2022), added to cross entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from ._functional import SegLoss, extended_target, masked_mean, pixel_cross_entropy

# Neighbour offsets (dy, dx) in the order of the released code: down, up, left, right, up-right,
# down-right, up-left, down-left. Ties in the distance map go to the first, so axis steps win.
DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (-1, 0), (0, -1), (0, 1), (-1, 1), (1, 1), (-1, -1), (1, -1))
BOUNDARY_EPS = 1e-5  # lowest KL threshold of the boundary detector (the released code starts its search here)


def shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., i, j] = padded[..., i + dy, j + dx]`` of a tensor padded by one pixel on each side."""
    h, w = t.shape[-2] - 2, t.shape[-1] - 2
    return t[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def gt_boundary(target_ext: Tensor, num_classes: int) -> Tensor:
    """Ground-truth boundary ``[N,H,W]`` bool, as in the released code: pixel (i, j) is on it when its
    label differs from the one below or to the right of it (one-sided), and every ignored pixel is on it."""
    t = target_ext
    down = F.pad((t[:, 1:, :] != t[:, :-1, :]).to(torch.uint8), (0, 0, 0, 1)).bool()
    right = F.pad((t[:, :, 1:] != t[:, :, :-1]).to(torch.uint8), (0, 1, 0, 0)).bool()
    return down | right | (t >= num_classes)


def boundary_distance(boundary: Tensor, dtype: torch.dtype = torch.float32, integer: bool = False) -> Tensor:
    """d' = max(d - 1, 0) ``[N,H,W]`` (``dtype``) on the input's device, d = Euclidean distance to the nearest
    boundary pixel of the same image (``scipy.ndimage.distance_transform_edt`` on the host). An image
    without boundary pixels gets d' = 0 everywhere.

    ``integer=True``: floor(d'), the released code's map (its one-hot mask is int32, so the signed
    distance it writes into it is truncated towards zero: d' = -trunc(1 - d) = floor(d) - 1 off the
    boundary, 0 on it)."""
    masks = boundary.detach().cpu().numpy()
    out = np.zeros(masks.shape, dtype=np.float64)
    for n, mask in enumerate(masks):
        if mask.any():
            out[n] = np.maximum(distance_transform_edt(~mask) - 1.0, 0.0)
    if integer:
        out = np.floor(out)
    return torch.from_numpy(out).to(device=boundary.device, dtype=dtype)


def direction_targets(dist: Tensor) -> Tensor:
    """Index into DIRECTIONS of the neighbour with the smallest ``dist`` (first one on ties) ``[N,H,W]``;
    positions outside the image count as infinitely far."""
    padded = F.pad(dist, (1, 1, 1, 1), value=float("inf"))
    return torch.stack([shift(padded, dy, dx) for dy, dx in DIRECTIONS]).argmin(0)


def predicted_boundary(logp: Tensor, valid: Tensor, max_fraction: float) -> Tensor:
    """Dilated predicted boundary ``[N,H,W]`` bool (no gradient).

    B_i = KL(p_i || p_down(i)) + KL(p_i || p_right(i)) (a missing neighbour adds 0), set to 0 at ignored i;
    boundary = B > max(1e-5, B_(m+1)) with B_(m+1) the (m+1)-th largest B of the batch and
    m = floor(max_fraction * N H W), so at most m pixels qualify; then a 3x3 dilation.
    """
    with torch.no_grad():
        q = logp.exp()
        kl_down = (q[:, :, :-1] * (logp[:, :, :-1] - logp[:, :, 1:])).sum(1)
        kl_right = (q[:, :, :, :-1] * (logp[:, :, :, :-1] - logp[:, :, :, 1:])).sum(1)
        b = (F.pad(kl_down, (0, 0, 0, 1)) + F.pad(kl_right, (0, 1, 0, 0))) * valid
        m = int(max_fraction * b.numel())
        thr = torch.full((), BOUNDARY_EPS, dtype=b.dtype, device=b.device)
        if m < b.numel():
            thr = torch.maximum(thr, b.reshape(-1).topk(m + 1).values[-1])
        core = (b > thr).to(b.dtype).unsqueeze(1)
        return F.max_pool2d(core, 3, stride=1, padding=1).squeeze(1) > 0


def direction_logits(logp: Tensor) -> Tensor:
    """z_k(i) = KL(sg(p_{i+k}) || p_i) for the 8 neighbours k of DIRECTIONS ``[N,8,H,W]``; the neighbour is
    detached (sg), image borders are replicated."""
    q_log = F.pad(logp.detach(), (1, 1, 1, 1), mode="replicate")
    q = q_log.exp()
    neg_entropy = (q * q_log).sum(1)  # sum_c q log q of every (padded) neighbour, no gradient
    return torch.stack([shift(neg_entropy, dy, dx) - (shift(q, dy, dx) * logp).sum(1) for dy, dx in DIRECTIONS], 1)


class ActiveBoundaryLoss(SegLoss):
    """L = CE + weight * ABL, CE the mean over valid pixels, and

        ABL = (1/|K|) sum_{i in K} w_i * LSCE(z(i), k*(i)),   K = valid pixels of the predicted boundary

    - predicted boundary: B_i = KL(p_i||p_down) + KL(p_i||p_right) on p = softmax(x), threshold adapted so at
      most ``max_boundary_fraction`` (1 %) of the batch's pixels exceed it, dilated 3x3 (no gradient);
    - ground truth: boundary pixels = label differs from the pixel below / to the right, plus ignored pixels;
      d' = max(EDT - 1, 0), the Euclidean distance map of the paper (scipy on the host), or with
      ``official_compat=True`` the released code's integer map floor(d') (its int32 one-hot truncates the
      distances; this changes the direction target on many weighted pixels, where distances tie);
    - k*(i) = argmin over the 8 neighbours of d' (axis steps first on ties); w_i = min(d'_i, 20) / 20;
    - z_k(i) = KL(sg(p_{i+k}) || p_i), the neighbour detached, borders replicated;
    - LSCE = label-smoothed CE over the 8 directions, targets (1 - s) onehot + s/8, s = ``label_smoothing``.

    Differences from the released code: the threshold is the exact (m+1)-th largest value instead of a x1.2
    geometric search, m is a fraction of all N H W pixels of the batch (the released code takes the fraction of
    one image's H W for the whole batch), ignored pixels are never centres (they still act as GT boundary),
    the released label smoothing puts 1 - s (not 1 - s + s/8) on the target, and a batch without predicted
    boundary gives ABL = 0 instead of None. ``official_compat`` switches only the distance map; the
    differences listed here stay. ``weight`` defaults to 1 (plain sum); the paper's combination weight was
    not verified here.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, weight: float = 1.0,
                 max_boundary_fraction: float = 0.01, label_smoothing: float = 0.2,
                 max_distance: float = 20.0, official_compat: bool = False) -> None:
        super().__init__(num_classes, ignore_index)
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        if not 0.0 <= max_boundary_fraction <= 1.0:
            raise ValueError(f"max_boundary_fraction must be in [0, 1], got {max_boundary_fraction!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not max_distance > 0:
            raise ValueError(f"max_distance must be > 0, got {max_distance!r}")
        self.weight = float(weight)
        self.max_boundary_fraction = float(max_boundary_fraction)
        self.label_smoothing = float(label_smoothing)
        self.max_distance = float(max_distance)
        self.official_compat = bool(official_compat)

    def boundary_term(self, x: Tensor, target_ext: Tensor, valid: Tensor) -> Tensor:
        """The ABL term (without ``weight``)."""
        logp = x.log_softmax(1)
        fvalid = valid.to(x.dtype)
        pred = predicted_boundary(logp.detach(), fvalid, self.max_boundary_fraction) & valid
        dist = boundary_distance(gt_boundary(target_ext, self.num_classes), x.dtype, integer=self.official_compat)
        k_star = direction_targets(dist)
        w = dist.clamp(max=self.max_distance) / self.max_distance * pred.to(x.dtype)
        logz = direction_logits(logp).log_softmax(1)
        s = self.label_smoothing
        lsce = -(1.0 - s) * logz.gather(1, k_star.unsqueeze(1)).squeeze(1) - (s / len(DIRECTIONS)) * logz.sum(1)
        return masked_mean(w * lsce, pred.to(x.dtype))

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        valid = t_ext < self.num_classes
        ce = masked_mean(pixel_cross_entropy(x, target, self.ignore_index), valid.to(x.dtype))
        if self.weight == 0.0:
            return ce
        return ce + self.weight * self.boundary_term(x, t_ext, valid)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.weight}, max_boundary_fraction={self.max_boundary_fraction}, "
                f"label_smoothing={self.label_smoothing}, max_distance={self.max_distance}, "
                f"official_compat={self.official_compat}")

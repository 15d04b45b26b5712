"""Structural similarity loss (Zhao et al., 2019): CE re-weighted by a local structure error."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._functional import SegLoss, extended_target, masked_mean, one_hot, pixel_cross_entropy

WINDOW_RADIUS = 5  # 11 x 11 Gaussian window, as in SSIM


def gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian ``[2 radius + 1]``: g_k = exp(-k^2 / (2 sigma^2)) / sum_k (...)."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def masked_local_mean(v: Tensor, mask: Tensor, kernel: Tensor) -> Tensor:
    """Normalised convolution G*(v m) / G*m over ``[N,C,H,W]`` (``mask`` ``[N,1,H,W]``): the Gaussian-weighted
    mean of ``v`` over the valid pixels of the window; positions outside the image count as invalid."""
    r = kernel.shape[0] // 2

    def blur(t: Tensor) -> Tensor:
        c = t.shape[1]
        t = F.conv2d(t, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)
        return F.conv2d(t, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)

    return blur(v * mask) / blur(mask).clamp_min(1e-12)


def structure_error(y: Tensor, p: Tensor, mask: Tensor, sigma: float, eps: float) -> Tensor:
    """e = |(y - mu_y)/(sigma_y + eps) - (p - mu_p)/(sigma_p + eps)| ``[N,C,H,W]``, with mu, sigma the local
    Gaussian-window mean and standard deviation (over valid pixels) of each class channel."""
    kernel = gaussian_kernel(sigma, WINDOW_RADIUS, p.dtype, p.device)

    def normalised(v: Tensor) -> Tensor:
        mu = masked_local_mean(v, mask, kernel)
        var = masked_local_mean(v * v, mask, kernel) - mu * mu
        return (v - mu) / (var.clamp_min(0).sqrt() + eps)

    return (normalised(y) - normalised(p)).abs()


class StructuralSimilarityLoss(SegLoss):
    """L = gamma * CE + (1 - gamma) * L_ssl, CE the mean over valid pixels, p = softmax(x), y = one-hot, and

        e_nc = |(y_nc - mu_y)/(sigma_y + eps) - (p_nc - mu_p)/(sigma_p + eps)|
        L_ssl = sum_n f_n e_n CE_n / sum_n f_n,   e_n = e_{n, y_n},  f_n = [e_n > beta * max_m e_m]

    mu, sigma: mean and standard deviation in an 11x11 Gaussian window (``sigma_window`` 1.5) of each class
    channel, over the valid pixels of the window (normalised convolution; outside the image = invalid).
    The paper's per-class sum sum_c f_nc e_nc (-y_nc log p_nc) keeps only the target class, hence e and f are
    taken at the target class; the max runs over the valid pixels of the batch. e and f are weights: no
    gradient flows through them. Defaults gamma = 0.5, beta = 0.1, eps = 0.01 (the paper's C4).
    A batch without hard position has L_ssl = 0.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, gamma: float = 0.5, beta: float = 0.1,
                 sigma_window: float = 1.5, eps: float = 0.01) -> None:
        super().__init__(num_classes, ignore_index)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (sigma_window > 0 and math.isfinite(sigma_window)):
            raise ValueError(f"sigma_window must be > 0, got {sigma_window!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.sigma_window = float(sigma_window)
        self.eps = float(eps)

    def hard_weights(self, x: Tensor, target_ext: Tensor) -> tuple[Tensor, Tensor]:
        """(f_n e_n, f_n) ``[N,H,W]`` each (no gradient; 0 at ignored pixels)."""
        c = self.num_classes
        with torch.no_grad():
            valid = (target_ext < c).unsqueeze(1).to(x.dtype)
            p = x.softmax(1) * valid
            y = one_hot(target_ext, c, x.dtype)
            e = structure_error(y, p, valid, self.sigma_window, self.eps)
            safe = torch.where(target_ext < c, target_ext, torch.zeros_like(target_ext))
            e_t = e.gather(1, safe.unsqueeze(1)).squeeze(1) * valid.squeeze(1)
            hard = e_t > self.beta * e_t.amax()
            return e_t * hard.to(x.dtype), hard.to(x.dtype)

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        valid = (t_ext < self.num_classes).to(x.dtype)
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        ce = masked_mean(nll, valid)
        if self.gamma == 1.0:
            return ce
        fe, f = self.hard_weights(x, t_ext)
        return self.gamma * ce + (1.0 - self.gamma) * masked_mean(fe * nll, f)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gamma={self.gamma}, beta={self.beta}, "
                f"sigma_window={self.sigma_window}, eps={self.eps}")

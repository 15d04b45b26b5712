"""Structural similarity loss (Zhao et al. 2019, "Correlation Maximized Structural Similarity Loss for
Semantic Segmentation", arXiv:1910.08711): CE re-weighted by a local structure error."""

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
    """e = |(y - mu_y + C4)/(sigma_y + C4) - (p - mu_p + C4)/(sigma_p + C4)| ``[N,C,H,W]`` with C4 = ``eps``,
    mu and sigma the local Gaussian-window mean and standard deviation (over valid pixels) of each class
    channel."""
    kernel = gaussian_kernel(sigma, WINDOW_RADIUS, p.dtype, p.device)

    def normalised(v: Tensor) -> Tensor:
        mu = masked_local_mean(v, mask, kernel)
        var = masked_local_mean(v * v, mask, kernel) - mu * mu
        return (v - mu + eps) / (var.clamp_min(0).sqrt() + eps)

    return (normalised(y) - normalised(p)).abs()


class StructuralSimilarityLoss(SegLoss):
    """L = gamma * CE + (1 - gamma) * L_ssl, CE the mean over valid pixels, p = softmax(x), y = one-hot, and,
    over the valid positions n and ALL classes c:

        e_nc  = |(y_nc - mu_y + C4)/(sigma_y + C4) - (p_nc - mu_p + C4)/(sigma_p + C4)|
        f_nc  = [e_nc > beta * e_max],   e_max = max_{n,c} e_nc
        L_ssl = (1/M) sum_n sum_c f_nc e_nc (-y_nc log p_nc),   M = sum_n sum_c f_nc

    The equations of Zhao et al. 2019 (structure comparison, hard-position coefficient and mini-batch loss),
    as transcribed in Jadon's 2020 survey of segmentation losses (arXiv:2006.14822, Sec. II-N); the paper's
    own text was not available to re-check here. Since -y_nc log p_nc is CE_n at the target class and 0
    elsewhere, the numerator is sum_n f_{n,y_n} e_{n,y_n} CE_n, while M counts the hard (n, c) pairs of
    every class channel and e_max runs over every channel.

    mu, sigma: mean and standard deviation in an 11x11 Gaussian window (``sigma_window`` 1.5) of each class
    channel, over the valid pixels of the window (normalised convolution; outside the image = invalid).
    e and f are weights: no gradient flows through them. Defaults gamma = 0.5, beta = 0.1, eps = C4 = 0.01.
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
        """(f_{n,y_n} e_{n,y_n} ``[N,H,W]`` (0 at ignored pixels), M = sum_{n,c} f_nc) without gradient."""
        c = self.num_classes
        with torch.no_grad():
            valid = (target_ext < c).unsqueeze(1).to(x.dtype)
            p = x.softmax(1) * valid
            y = one_hot(target_ext, c, x.dtype)
            e = structure_error(y, p, valid, self.sigma_window, self.eps) * valid
            hard = (e > self.beta * e.amax()).to(x.dtype)
            fe_target = (hard * e * y).sum(1)
            return fe_target, hard.sum()

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        valid = (t_ext < self.num_classes).to(x.dtype)
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        ce = masked_mean(nll, valid)
        if self.gamma == 1.0:
            return ce
        fe, m = self.hard_weights(x, t_ext)
        return self.gamma * ce + (1.0 - self.gamma) * masked_mean(fe * nll, m)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gamma={self.gamma}, beta={self.beta}, "
                f"sigma_window={self.sigma_window}, eps={self.eps}")

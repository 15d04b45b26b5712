"""Shared pieces of the pairwise (regularized) losses: the grid they run on, Gaussian kernels, the
Potts-type quadratic form.

Grid: the softmax and the guidance signals (image, features) are resized bilinearly
(``align_corners=False``, no antialiasing) to ``round(scale * H) x round(scale * W)``; when that grid
has more than ``max_pixels`` pixels it is shrunk by one more factor ``r = sqrt(max_pixels / P)`` (sides
floored), the approximation used beyond the exact size, and the pairwise sum is multiplied by
``(P_requested / P_used)^2`` so that it estimates the sum over the requested grid (each remaining
pixel stands for ``P_requested / P_used`` pixels, a pair for the square of that).
Positions are pixel centres in the coordinates of the input (full-resolution) image, so ``sigma_xy`` is
in input pixels whatever the grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: {value!r} is not allowed (allowed: a finite number > 0)")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: {value!r} is not allowed (allowed: a finite number >= 0)")


def check_grid_options(scale: float, exact_max_pixels: int) -> None:
    """ValueError naming the parameter unless 0 < scale <= 1 and exact_max_pixels is an int >= 1."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= 1):
        raise ValueError(f"scale: {scale!r} is not allowed (allowed: a number in (0, 1])")
    if isinstance(exact_max_pixels, bool) or not isinstance(exact_max_pixels, int) or exact_max_pixels < 1:
        raise ValueError(f"exact_max_pixels: {exact_max_pixels!r} is not allowed (allowed: an integer >= 1)")


def loss_grid(height: int, width: int, scale: float, max_pixels: int) -> tuple[tuple[int, int], float]:
    """((h, w) of the grid the pairwise term runs on, factor (P_requested / P_used)^2)."""
    hs, ws = max(1, round(height * scale)), max(1, round(width * scale))
    requested = hs * ws
    if requested > max_pixels:
        r = math.sqrt(max_pixels / requested)
        hs, ws = max(1, math.floor(hs * r)), max(1, math.floor(ws * r))
    return (hs, ws), (requested / (hs * ws)) ** 2


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size`` (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pixel_positions(size: tuple[int, int], full_size: tuple[int, int], like: Tensor) -> Tensor:
    """``[h*w, 2]`` (y, x) of the grid's pixel centres in full-resolution pixel units, row-major."""
    (h, w), (H, W) = size, full_size
    ys = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) * (H / h)
    xs = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) * (W / w)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def gaussian_kernel(features: Tensor) -> Tensor:
    """``[P, P]`` with entries exp(-|f_i - f_j|^2 / 2) for ``features`` ``[P, D]`` (already divided by
    their bandwidths); the diagonal is 1."""
    sq = (features * features).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * features @ features.T).clamp_min(0)
    return torch.exp(-0.5 * dist)


def potts_quadratic(probs: Tensor, kernel: Tensor) -> Tensor:
    """sum_k S_k^T W (1 - S_k) for ``probs`` S ``[P, K]`` and a symmetric ``kernel`` W ``[P, P]``."""
    return (probs * (kernel @ (1.0 - probs))).sum()


def flat_pixels(x: Tensor) -> Tensor:
    """``[C, h, w]`` -> ``[h*w, C]`` (row-major pixels)."""
    return x.reshape(x.shape[0], -1).T

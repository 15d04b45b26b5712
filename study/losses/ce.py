"""Cross entropy and its static class-weighted variants (weights from training-set class counts)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._functional import SegLoss, extended_target, masked_mean, pixel_cross_entropy

REDUCTIONS = ("weighted", "mean")


def _counts_array(class_counts: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    counts = np.asarray(class_counts.cpu() if isinstance(class_counts, Tensor) else class_counts,
                        dtype=np.float64).reshape(-1)
    if counts.shape[0] != num_classes:
        raise ValueError(f"class_counts has {counts.shape[0]} entries, expected num_classes={num_classes}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError("class_counts must be finite, non-negative and not all zero")
    return counts


def median_frequency_weights(class_counts: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    """w_c = median_{k: n_k>0}(f_k) / f_c with f_c = n_c / sum_k n_k; w_c = 0 where n_c = 0.

    (Eigen & Fergus divide by the pixels of the images containing c; only totals are available here.)
    """
    counts = _counts_array(class_counts, num_classes)
    freq = counts / counts.sum()
    present = counts > 0
    med = np.median(freq[present])
    return np.where(present, med / np.where(present, freq, 1.0), 0.0)


def inverse_frequency_weights(class_counts: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    """w_c = sum_k n_k / (C * n_c) (1 for every class when balanced); w_c = 0 where n_c = 0."""
    counts = _counts_array(class_counts, num_classes)
    present = counts > 0
    return np.where(present, counts.sum() / (num_classes * np.where(present, counts, 1.0)), 0.0)


def class_balanced_weights(class_counts: Sequence[int] | np.ndarray | Tensor, num_classes: int,
                           beta: float | None = None) -> np.ndarray:
    """Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta^{n_c}), normalised to sum to C.

    ``beta=None`` takes beta = (N - 1) / N with N = sum_c n_c (the released code's choice).
    Classes with n_c = 0 get weight 0 (before normalisation).
    """
    counts = _counts_array(class_counts, num_classes)
    if beta is None:
        beta = (counts.sum() - 1.0) / counts.sum()
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    present = counts > 0
    # 1 - beta^n computed as -expm1(n * log(beta)) for accuracy when beta is close to 1
    log_beta = math.log(beta) if beta > 0 else -math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = -np.expm1(np.where(present, counts, 1.0) * log_beta)
        raw = np.where(present, (1.0 - beta) / eff, 0.0)
    return raw * num_classes / raw.sum()


class CrossEntropy(SegLoss):
    """Cross entropy, mean over valid pixels: L = (1/|V|) sum_{n in V} -log softmax(x_n)_{y_n}.

    Equals ``F.cross_entropy(ignore_index=...)``; a batch with no valid pixel gives a graph-attached 0.
    """

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        valid = (target != self.ignore_index).to(x.dtype)
        return masked_mean(nll, valid)


class _StaticWeightedCE(SegLoss):
    """CE with fixed per-class weights w (a buffer, moved with the module).

    reduction="weighted" (default, = ``F.cross_entropy(weight=w)`` as the released code trains):
        L = sum_{n in V} w_{y_n} CE_n / sum_{n in V} w_{y_n}
    reduction="mean": L = (1/|V|) sum_{n in V} w_{y_n} CE_n
    """

    def __init__(self, num_classes: int, weights: np.ndarray, ignore_index: int = 255,
                 reduction: str = "weighted") -> None:
        super().__init__(num_classes, ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("weight", torch.as_tensor(weights, dtype=torch.float32))

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        nll = pixel_cross_entropy(x, target, self.ignore_index)
        t_ext = extended_target(target, self.num_classes, self.ignore_index)
        w_ext = torch.cat([self.weight.to(device=x.device, dtype=x.dtype), x.new_zeros(1)])
        w_pix = w_ext[t_ext]
        if self.reduction == "weighted":
            return masked_mean(w_pix * nll, w_pix)
        return masked_mean(w_pix * nll, (t_ext < self.num_classes).to(x.dtype))


class WeightedCrossEntropy(_StaticWeightedCE):
    """Class-weighted CE, weights from ``class_counts`` by ``scheme``:
    "median": w_c = median_k f_k / f_c (median frequency balancing, Eigen & Fergus 2015),
    "inverse": w_c = sum_k n_k / (C n_c); f_c = n_c / sum_k n_k, w_c = 0 for n_c = 0.
    Reduction as in :class:`_StaticWeightedCE`.
    """

    SCHEMES = ("median", "inverse")

    def __init__(self, num_classes: int, class_counts: Sequence[int], ignore_index: int = 255,
                 scheme: str = "median", reduction: str = "weighted") -> None:
        if scheme not in self.SCHEMES:
            raise ValueError(f"scheme must be one of {self.SCHEMES}, got {scheme!r}")
        fn = median_frequency_weights if scheme == "median" else inverse_frequency_weights
        super().__init__(num_classes, fn(class_counts, num_classes), ignore_index, reduction)
        self.scheme = scheme


class ClassBalancedCrossEntropy(_StaticWeightedCE):
    """Class-balanced CE (Cui et al. 2019): w_c = (1-beta)/(1-beta^{n_c}) normalised to sum_c w_c = C,
    beta defaulting to (N-1)/N with N = total pixel count. Reduction as in :class:`_StaticWeightedCE`.
    """

    def __init__(self, num_classes: int, class_counts: Sequence[int], ignore_index: int = 255,
                 beta: float | None = None, reduction: str = "weighted") -> None:
        super().__init__(num_classes, class_balanced_weights(class_counts, num_classes, beta),
                         ignore_index, reduction)
        self.beta = beta

"""Dynamic Feature Regularized loss (Zhang, Xiao, Zhao, arXiv 2108.01296 / Pattern Recognition 2025).

    L = partial CE  +  weight * (1/N) sum_n c_n sum_k S_k^T W (1 - S_k)  +  consistency_weight * L_fc

The paper's equations could not be retrieved here (no official code is public); this follows the
paper's description (abstract and method outline: a regularized loss in the form of Tang et al.
whose kernel combines shallow features (colour, position) with deep features that are updated
during training; a feature consistency head trained from the scribbles to model pair-wise feature
relations; everything trained end to end). Choices made here, each marked (choice):

- Kernel (choice: additive combination, both terms Gaussian):
      W_ij = exp(-|I_i - I_j|^2 / (2 sigma_rgb^2) - |p_i - p_j|^2 / (2 sigma_xy^2))
           + deep_weight * exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |e_i - e_j|^2 / (2 sigma_deep^2))
  I: RGB (0..255), p: position in input pixels, e_i: unit-norm embedding of the network's features
  at pixel i produced by the feature consistency head. "Dynamic": e is recomputed from the current
  features at every call. (choice) e is detached inside W, so the regularizer trains the prediction
  S only; the embeddings learn from L_fc.
- Regularizer: sum_k S_k^T W (1 - S_k) per image on the loss grid, normalised like
  :class:`~study.losses.dense_crf.DenseCRFLoss` (summed over pixel pairs, mean over images,
  same exact/approximate grid rule and factor c_n).
- Feature consistency head (choice: inside the loss, so it works with any backbone; its parameters
  must be given to the optimizer): 1x1 conv (feature_channels -> hidden) + ReLU + 1x1 conv
  (hidden -> embed_dim), L2-normalised per pixel; ``feature_channels=None`` builds the first conv lazily.
- Pair-wise relation predicted by the head: A_ij = exp(-|e_i - e_j|^2 / (2 sigma_deep^2)), the
  same Gaussian as the deep kernel term, so the kernel uses what L_fc trains.
- Feature consistency loss (choice: binary cross entropy on labelled pixel pairs):
      L_fc = (1/|images with pairs|) sum_n [sum_{i != j} m_i m_j BCE(A_ij, y_ij) / sum_{i != j} m_i m_j]
  on the loss grid: q_ic = share of cell i's input pixels labelled c (area pooling of the scribble
  one-hot), m_i = sum_c q_ic (labelled share of the cell), y_ij = sum_c q_ic q_jc / (m_i m_j)
  (1 for two cells of the same class, 0 for different classes). With ``scale=1`` this is the mean
  BCE over ordered pairs of distinct labelled pixels, 1 for same class and 0 otherwise.
  A_ij is clamped to [1e-6, 1 - 1e-6] inside the logarithms.

Features: ``features`` ``[N, D, h, w]`` from the network (any stride), resized bilinearly to the loss
grid. Called as ``loss(logits, target, image=rgb, features=feats)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._functional import SegLoss, as_float, check_inputs, extended_target, one_hot
from ._pairwise import (_check_non_negative, _check_positive, check_grid_options, flat_pixels,
                        gaussian_kernel, loss_grid, pixel_positions, potts_quadratic, resize)
from .dense_crf import bilateral_features, check_image, partial_cross_entropy

_EPS = 1e-6


class FeatureConsistencyHead(nn.Module):
    """features ``[N, D, h, w]`` -> unit-norm embeddings ``[N, embed_dim, h, w]`` (1x1 conv, ReLU, 1x1 conv)."""

    def __init__(self, feature_channels: int | None, hidden: int, embed_dim: int) -> None:
        super().__init__()
        first = nn.LazyConv2d(hidden, 1) if feature_channels is None else nn.Conv2d(feature_channels, hidden, 1)
        self.net = nn.Sequential(first, nn.ReLU(inplace=True), nn.Conv2d(hidden, embed_dim, 1))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.net(features), dim=1)


def pair_targets(target: Tensor, num_classes: int, ignore_index: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(q ``[N, C, h, w]`` labelled class shares per grid cell, m ``[N, h, w]`` labelled share)."""
    t_ext = extended_target(target, num_classes, ignore_index)
    q = one_hot(t_ext, num_classes, torch.float32)
    if tuple(q.shape[-2:]) != tuple(size):
        q = F.adaptive_avg_pool2d(q, size)  # area pooling: the share of each cell's pixels
    return q, q.sum(1)


def consistency_bce(affinity: Tensor, q: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_{i != j} m_i m_j BCE(A_ij, y_ij), sum_{i != j} m_i m_j) for one image; A ``[P, P]``,
    q ``[P, C]``, m ``[P]``; y_ij m_i m_j = q_i . q_j."""
    pair_w = m[:, None] * m[None, :]
    pair_w = pair_w - torch.diag(torch.diagonal(pair_w))
    same = q @ q.T - torch.diag(torch.diagonal(q @ q.T))  # y_ij m_i m_j, diagonal removed
    a = affinity.clamp(_EPS, 1 - _EPS)
    bce = -(same * torch.log(a) + (pair_w - same) * torch.log1p(-a))
    return bce.sum(), pair_w.sum()


class DynamicFeatureRegularizedLoss(SegLoss):
    """Partial CE + ``weight`` x dynamic-kernel regularizer + ``consistency_weight`` x L_fc; formulas and
    choices in the module docstring. ``loss(logits, target, image=rgb 0..255 [N,3,H,W],
    features=[N,D,h,w])``. Holds trainable parameters (the feature consistency head)."""

    needs: ClassVar[frozenset[str]] = frozenset({"image", "features"})

    def __init__(self, num_classes: int, ignore_index: int = 255, weight: float = 2e-9, sigma_rgb: float = 15.0,
                 sigma_xy: float = 100.0, deep_weight: float = 1.0, sigma_deep: float = 0.5,
                 consistency_weight: float = 1.0, feature_channels: int | None = None, embed_dim: int = 32,
                 hidden: int = 64, scale: float = 0.5, exact_max_pixels: int = 4096) -> None:
        super().__init__(num_classes, ignore_index)
        for name, value in (("weight", weight), ("deep_weight", deep_weight), ("consistency_weight", consistency_weight)):
            _check_non_negative(name, value)
        for name, value in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("sigma_deep", sigma_deep)):
            _check_positive(name, value)
        for name, value in (("embed_dim", embed_dim), ("hidden", hidden), ("feature_channels", feature_channels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: {value!r} is not allowed (allowed: an integer >= 1)")
        check_grid_options(scale, exact_max_pixels)
        self.weight, self.deep_weight, self.consistency_weight = float(weight), float(deep_weight), float(consistency_weight)
        self.sigma_rgb, self.sigma_xy, self.sigma_deep = float(sigma_rgb), float(sigma_xy), float(sigma_deep)
        self.scale, self.exact_max_pixels = float(scale), int(exact_max_pixels)
        self.head = FeatureConsistencyHead(feature_channels, hidden, embed_dim)

    def forward(self, logits: Tensor, target: Tensor, image: Tensor | None = None,  # type: ignore[override]
                features: Tensor | None = None) -> Tensor:
        check_inputs(logits, target, self.num_classes)
        check_image(image, logits)
        if features is None or features.dim() != 4 or features.shape[0] != logits.shape[0]:
            raise ValueError("this loss needs features=[N, D, h, w] from the network (model(x, return_features=True))")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = as_float(logits)
            size, factor = loss_grid(x.shape[2], x.shape[3], self.scale, self.exact_max_pixels)
            embed = resize(self.head(features.to(x.dtype)), size)
            reg, fc = self.pairwise_terms(x, target, image.to(x.dtype), embed, size)
            return (partial_cross_entropy(x, target, self.ignore_index) + self.weight * factor * reg
                    + self.consistency_weight * fc)

    def deep_kernel(self, embed: Tensor, positions: Tensor) -> Tensor:
        """exp(-|p_i - p_j|^2/(2 sigma_xy^2) - |e_i - e_j|^2/(2 sigma_deep^2)) for e ``[P, E]``, p ``[P, 2]``."""
        return gaussian_kernel(torch.cat([embed / self.sigma_deep, positions / self.sigma_xy], 1))

    def pairwise_terms(self, x: Tensor, target: Tensor, image: Tensor, embed: Tensor,
                       size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """((1/N) sum_n sum_k S_k^T W (1 - S_k) without factor/weight, L_fc) over the batch."""
        probs = resize(torch.softmax(x, 1), size)
        q, m = pair_targets(target, self.num_classes, self.ignore_index, size)
        q, m = q.to(x.dtype), m.to(x.dtype)
        positions = pixel_positions(size, tuple(x.shape[-2:]), x)
        reg, fc, with_pairs = x.new_zeros(()), x.new_zeros(()), x.new_zeros(())
        for n in range(x.shape[0]):
            e = flat_pixels(embed[n])
            with torch.no_grad():
                kernel = gaussian_kernel(bilateral_features(image[n], size, self.sigma_rgb, self.sigma_xy))
                kernel = kernel + self.deep_weight * self.deep_kernel(e.detach(), positions)
            reg = reg + potts_quadratic(flat_pixels(probs[n]), kernel)
            affinity = gaussian_kernel(e / self.sigma_deep)
            bce_sum, pair_sum = consistency_bce(affinity, flat_pixels(q[n]), m[n].reshape(-1))
            has = (pair_sum > 0).to(x.dtype)
            fc = fc + has * bce_sum / torch.where(pair_sum > 0, pair_sum, torch.ones_like(pair_sum))
            with_pairs = with_pairs + has
        return reg / x.shape[0], fc / with_pairs.clamp_min(1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.weight}, deep_weight={self.deep_weight}, "
                f"sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, sigma_deep={self.sigma_deep}, "
                f"consistency_weight={self.consistency_weight}, scale={self.scale}, "
                f"exact_max_pixels={self.exact_max_pixels}")

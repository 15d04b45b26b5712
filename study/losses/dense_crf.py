"""Partial cross entropy + DenseCRF regularized loss (Tang et al., "On Regularized Losses for
Weakly-supervised CNN Segmentation", ECCV 2018).

    L = (1/|V|) sum_{i in V} -log S_{i, y_i}  +  weight * (1/N) sum_n c_n * sum_k S_k^T W (1 - S_k)

- V: labelled (scribble) pixels of the batch, the partial CE of the paper; ``ignore_index`` elsewhere.
- S = softmax(logits) resized bilinearly to the loss grid (``scale`` x the input, see
  ``study.losses._pairwise``), S_k its column for class k, one image at a time.
- W_ij = exp(-|I_i - I_j|^2 / (2 sigma_rgb^2) - |p_i - p_j|^2 / (2 sigma_xy^2)): the dense bilateral
  Gaussian kernel over RGB values I (0..255, resized like S) and pixel positions p (in input pixels),
  computed exactly (a P x P matrix, P grid pixels, diagonal W_ii = 1 included).
- Normalisation: the pairwise sum is per image (summed over all pixel pairs, not divided by P) and
  averaged over the N images, as in the released code (which divides by the batch size).
- Exact up to ``exact_max_pixels`` grid pixels; beyond, the approximation: the grid is shrunk further
  to at most ``exact_max_pixels`` pixels and the sum multiplied by c_n = (P_requested / P_used)^2.

Defaults are the released PyTorch configuration (meng-tang/rloss,
``pytorch/pytorch-deeplab_v3_plus/train_withdensecrfloss.sh``: ``--densecrfloss 2e-9 --rloss-scale 0.5
--sigma-rgb 15 --sigma-xy 100``); there sigma_xy is applied on the downscaled image as
``sigma_xy * scale``, which equals ``sigma_xy`` in input pixels here. The released code evaluates
-sum_k S_k^T W S_k with a permutohedral-lattice filter; that differs from the form above by the
constant 1^T W 1 (sum_k S_k = 1), so the gradients agree. The weight 2e-9 is tuned for that
normalisation at PASCAL crop sizes (512 x 512, grid 256 x 256): the pairwise sum grows roughly with
P x (kernel mass per pixel), so smaller images need a larger weight for the same balance.
The released code also masks padded crop borders (its ROI); here every grid pixel takes part.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._functional import SegLoss, as_float, check_inputs, masked_mean, pixel_cross_entropy
from ._pairwise import (_check_non_negative, _check_positive, check_grid_options, flat_pixels,
                        gaussian_kernel, loss_grid, pixel_positions, potts_quadratic, resize)


def partial_cross_entropy(x: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """(1/|V|) sum_{i in V} CE_i over labelled pixels V (graph-attached 0 when V is empty)."""
    nll = pixel_cross_entropy(x, target, ignore_index)
    return masked_mean(nll, (target != ignore_index).to(x.dtype))


def check_image(image: Tensor | None, logits: Tensor) -> None:
    """ValueError unless ``image`` is ``[N, 3, H, W]`` matching the logits."""
    if image is None:
        raise ValueError("this loss needs image=[N, 3, H, W] RGB in 0..255 (the trainer passes it)")
    n, _, h, w = logits.shape
    if tuple(image.shape) != (n, 3, h, w):
        raise ValueError(f"image must be [N, 3, H, W] = {(n, 3, h, w)}, got shape {tuple(image.shape)}")


def bilateral_features(image: Tensor, size: tuple[int, int], sigma_rgb: float, sigma_xy: float) -> Tensor:
    """``[P, 5]`` per grid pixel: (R, G, B) / sigma_rgb and (y, x) / sigma_xy of one ``image`` [3, H, W]."""
    rgb = flat_pixels(resize(image[None], size)[0]) / sigma_rgb
    pos = pixel_positions(size, tuple(image.shape[-2:]), rgb) / sigma_xy
    return torch.cat([rgb, pos], 1)


class DenseCRFLoss(SegLoss):
    """Partial CE + ``weight`` x DenseCRF loss; formula, normalisation and defaults in the module
    docstring. Called as ``loss(logits, target, image=rgb)`` with ``rgb`` float ``[N, 3, H, W]`` in 0..255."""

    needs: ClassVar[frozenset[str]] = frozenset({"image"})

    def __init__(self, num_classes: int, ignore_index: int = 255, weight: float = 2e-9, sigma_rgb: float = 15.0,
                 sigma_xy: float = 100.0, scale: float = 0.5, exact_max_pixels: int = 4096) -> None:
        super().__init__(num_classes, ignore_index)
        _check_non_negative("weight", weight)
        _check_positive("sigma_rgb", sigma_rgb)
        _check_positive("sigma_xy", sigma_xy)
        check_grid_options(scale, exact_max_pixels)
        self.weight, self.sigma_rgb, self.sigma_xy = float(weight), float(sigma_rgb), float(sigma_xy)
        self.scale, self.exact_max_pixels = float(scale), int(exact_max_pixels)

    def forward(self, logits: Tensor, target: Tensor, image: Tensor | None = None) -> Tensor:  # type: ignore[override]
        check_inputs(logits, target, self.num_classes)
        check_image(image, logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = as_float(logits)
            return partial_cross_entropy(x, target, self.ignore_index) + self.weight * self.regularizer(
                x, image.to(x.dtype))

    def regularizer(self, x: Tensor, image: Tensor) -> Tensor:
        """(1/N) sum_n c_n sum_k S_k^T W (1 - S_k) (without ``weight``)."""
        size, factor = loss_grid(x.shape[2], x.shape[3], self.scale, self.exact_max_pixels)
        probs = resize(torch.softmax(x, 1), size)
        total = x.new_zeros(())
        for n in range(x.shape[0]):
            with torch.no_grad():
                kernel = gaussian_kernel(bilateral_features(image[n], size, self.sigma_rgb, self.sigma_xy))
            total = total + potts_quadratic(flat_pixels(probs[n]), kernel)
        return total * (factor / x.shape[0])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.weight}, sigma_rgb={self.sigma_rgb}, "
                f"sigma_xy={self.sigma_xy}, scale={self.scale}, exact_max_pixels={self.exact_max_pixels}")

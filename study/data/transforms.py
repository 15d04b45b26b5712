"""Joint image/label transforms for segmentation.

Images are uint8 HxWx3 numpy arrays (channel order as read: BGR from OpenCV unless converted),
labels uint8 HxW numpy arrays of class ids with ``ignore_index`` for unlabelled pixels. Every
random choice draws from the ``torch.Generator`` passed in (``None`` = torch's global RNG, which
a DataLoader seeds per worker), so a pipeline is deterministic given its generator state.

Order applied by :class:`SegTransform` for training: resize -> random scale -> random crop (padded
with 0 / ignore) -> horizontal flip -> colour jitter -> normalise (``augment_order=
"scale_crop_flip_jitter"``, the default), or, as the released Cityscapes pipeline, resize -> colour
jitter -> flip -> random scale -> random crop -> normalise (``"jitter_flip_scale_crop"``).
The colour jitter computes in float (default) or, as released, in PIL's 8-bit steps
(``jitter_arithmetic="uint8_steps"``). The scale factor is drawn from the range ``scale`` (uniform) or from the list ``scale_set`` (one
entry, uniformly; the released Cityscapes set is 0.75, 1, 1.25, 1.5, 1.75, 2). A crop larger than
the image pads it (``crop_small="pad"``) or, as released, first upscales it (``"upscale"``).
Evaluation: resize -> normalise.
Images are resized bilinearly, labels with nearest neighbour, so no new label values appear. Labels
use ``INTER_NEAREST_EXACT`` (pixel-centre aligned, as PIL/scikit-image) rather than ``INTER_NEAREST``
(the released code's), whose sampling grid is shifted by up to half a source pixel against the
bilinear image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np
import torch

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def resize(image: np.ndarray | None, label: np.ndarray | None, size: Sequence[int]
           ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Resize to ``size`` = [H, W]: image bilinear, label nearest. ``None`` inputs pass through."""
    h, w = int(size[0]), int(size[1])
    if image is not None and image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None and label.shape[:2] != (h, w):
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def random_scale(image: np.ndarray, label: np.ndarray, scale: Sequence[float],
                 gen: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Rescale both by one factor s ~ U(scale[0], scale[1]); new size = round(s * H), round(s * W)."""
    s = _uniform(gen, float(scale[0]), float(scale[1]))
    h, w = label.shape[:2]
    return resize(image, label, (max(1, round(h * s)), max(1, round(w * s))))  # type: ignore[return-value]


def random_scale_from_set(image: np.ndarray, label: np.ndarray, scales: Sequence[float],
                          gen: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Rescale both by one factor s drawn uniformly from the list ``scales``; new size = round(s * H), round(s * W)."""
    s = float(scales[_randint(gen, 0, len(scales) - 1)])
    h, w = label.shape[:2]
    return resize(image, label, (max(1, round(h * s)), max(1, round(w * s))))  # type: ignore[return-value]


def upscale_to_crop(image: np.ndarray, label: np.ndarray, crop: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The released crop's enlargement of an image smaller than the crop [H, W] in either side: factor
    f = W_crop / w if w < h else H_crop / h, new size int(f h + 1) x int(f w + 1) (image bilinear, label
    nearest). An image that covers the crop is returned unchanged."""
    ch, cw = int(crop[0]), int(crop[1])
    h, w = label.shape[:2]
    if h >= ch and w >= cw:
        return image, label
    f = cw / w if w < h else ch / h
    return resize(image, label, (int(f * h + 1), int(f * w + 1)))  # type: ignore[return-value]


def random_crop(image: np.ndarray, label: np.ndarray, crop: Sequence[int], gen: torch.Generator | None,
                ignore_index: int = 255, upscale_small: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Crop [H, W] at a uniform random offset. An image smaller than the crop is first upscaled
    (``upscale_small``, :func:`upscale_to_crop`); whatever is still smaller is padded bottom/right
    (image 0, label ignore)."""
    if upscale_small:
        image, label = upscale_to_crop(image, label, crop)
    ch, cw = int(crop[0]), int(crop[1])
    h, w = label.shape[:2]
    ph, pw = max(0, ch - h), max(0, cw - w)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore_index)
        h, w = label.shape[:2]
    y = _randint(gen, 0, h - ch)
    x = _randint(gen, 0, w - cw)
    return image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def random_hflip(image: np.ndarray, label: np.ndarray, gen: torch.Generator | None,
                 p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Mirror both left-right with probability p."""
    if float(torch.rand((), generator=gen)) < p:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def color_jitter(image: np.ndarray, strength: float, gen: torch.Generator | None,
                 bgr: bool = True, arithmetic: str = "float") -> np.ndarray:
    """Brightness, contrast and saturation factors each ~ U(max(0, 1 - s), 1 + s), applied in that order.

    ``arithmetic="float"`` (this project's default): brightness x * b; contrast
    (x - mean(grey)) * c + mean(grey); saturation (x - grey) * t + grey, with grey = 0.299 R + 0.587 G +
    0.114 B, all in float; the result is clipped to 0..255 once and rounded half up to uint8.

    ``arithmetic="uint8_steps"``: the released pipeline's PIL ``ImageEnhance`` steps, each returning an
    8-bit image, see :func:`_uint8_steps`. They differ where a step saturates (bright skies).
    """
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b, c, t = (_uniform(gen, lo, hi) for _ in range(3))
    if arithmetic == "uint8_steps":
        return _uint8_steps(image, b, c, t, bgr)
    x = image.astype(np.float32) * b
    weights = np.array([0.114, 0.587, 0.299] if bgr else [0.299, 0.587, 0.114], np.float32)
    grey = x @ weights
    x = (x - grey.mean()) * c + grey.mean()
    grey = x @ weights
    x = (x - grey[..., None]) * t + grey[..., None]
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)  # round half up


JITTER_ARITHMETIC = ("float", "uint8_steps")


def _blend_uint8(base: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """PIL's 8-bit blend: base + f * (image - base) in float32, clipped to 0..255, truncated to uint8."""
    b = base.astype(np.float32)
    out = b + np.float32(factor) * (image.astype(np.float32) - b)
    return np.clip(out, 0, 255).astype(np.uint8)


def _grey_uint8(image: np.ndarray, bgr: bool) -> np.ndarray:
    """PIL's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (ITU-R 601-2 in 16-bit fixed point)."""
    r, g, b = (image[..., i].astype(np.int32) for i in ((2, 1, 0) if bgr else (0, 1, 2)))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _uint8_steps(image: np.ndarray, b: float, c: float, t: float, bgr: bool) -> np.ndarray:
    """PIL's ``ImageEnhance.Brightness(b)`` -> ``Contrast(c)`` -> ``Color(t)`` on a uint8 image: each a
    :func:`_blend_uint8` of the image with a degenerate one: black; the grey image's mean rounded to an
    integer (``int(mean + 0.5)``); the per-pixel grey (:func:`_grey_uint8`)."""
    x = _blend_uint8(np.zeros_like(image), image, b)
    mean = int(_grey_uint8(x, bgr).mean() + 0.5)
    x = _blend_uint8(np.full_like(x, mean), x, c)
    return _blend_uint8(np.repeat(_grey_uint8(x, bgr)[..., None], 3, axis=-1), x, t)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel on 0..255 values; HxWx3 uint8 -> float32 tensor [3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(2, 0, 1).contiguous()


AUGMENT_ORDERS = ("scale_crop_flip_jitter", "jitter_flip_scale_crop")
CROP_SMALL = ("pad", "upscale")


@dataclass(frozen=True)
class SegTransform:
    """One pipeline; ``train=False`` (or all augmentation options off) gives resize + normalise only.

    mean/std are in the channel order of the image fed in (BGR when ``bgr``), on 0..255 values.
    ``scale`` (a range) and ``scale_set`` (a list of factors) are alternatives; ``augment_order`` and
    ``crop_small`` as in the module docstring (defaults: this project's order and padding).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False
    size: tuple[int, int] | None = None
    scale: tuple[float, float] | None = None
    crop: tuple[int, int] | None = None
    hflip: bool = False
    color_jitter: float = 0.0
    train: bool = False
    ignore_index: int = 255
    scale_set: tuple[float, ...] | None = None
    crop_small: Literal["pad", "upscale"] = "pad"
    augment_order: Literal["scale_crop_flip_jitter", "jitter_flip_scale_crop"] = "scale_crop_flip_jitter"
    jitter_arithmetic: Literal["float", "uint8_steps"] = "float"

    def __post_init__(self) -> None:
        if self.scale is not None and self.scale_set is not None:
            raise ValueError(f"scale_set: {self.scale_set!r} is not allowed together with scale {self.scale!r} "
                             f"(allowed: one of the two)")
        if self.scale_set is not None and (len(self.scale_set) == 0 or not all(
                np.isfinite(v) and v > 0 for v in self.scale_set)):
            raise ValueError(f"scale_set: {self.scale_set!r} is not allowed (allowed: a non-empty list of "
                             f"finite numbers > 0)")
        if self.crop_small not in CROP_SMALL:
            raise ValueError(f"crop_small: {self.crop_small!r} is not allowed (allowed: {list(CROP_SMALL)})")
        if self.augment_order not in AUGMENT_ORDERS:
            raise ValueError(f"augment_order: {self.augment_order!r} is not allowed (allowed: {list(AUGMENT_ORDERS)})")
        if self.jitter_arithmetic not in JITTER_ARITHMETIC:
            raise ValueError(f"jitter_arithmetic: {self.jitter_arithmetic!r} is not allowed "
                             f"(allowed: {list(JITTER_ARITHMETIC)})")

    def resize_label(self, label: np.ndarray) -> np.ndarray:
        """The deterministic part applied to a label (used for class counting)."""
        return label if self.size is None else resize(None, label, self.size)[1]  # type: ignore[return-value]

    def _scale_and_crop(self, image: np.ndarray, label: np.ndarray, gen: torch.Generator | None
                        ) -> tuple[np.ndarray, np.ndarray]:
        if self.scale is not None:
            image, label = random_scale(image, label, self.scale, gen)
        elif self.scale_set is not None:
            image, label = random_scale_from_set(image, label, self.scale_set, gen)
        if self.crop is not None:
            image, label = random_crop(image, label, self.crop, gen, self.ignore_index,
                                       upscale_small=self.crop_small == "upscale")
        return image, label

    def _flip_and_jitter(self, image: np.ndarray, label: np.ndarray, gen: torch.Generator | None,
                         jitter_first: bool) -> tuple[np.ndarray, np.ndarray]:
        if jitter_first and self.color_jitter > 0:
            image = color_jitter(image, self.color_jitter, gen, bgr=self.bgr, arithmetic=self.jitter_arithmetic)
        if self.hflip:
            image, label = random_hflip(image, label, gen)
        if not jitter_first and self.color_jitter > 0:
            image = color_jitter(image, self.color_jitter, gen, bgr=self.bgr, arithmetic=self.jitter_arithmetic)
        return image, label

    def augment(self, image: np.ndarray, label: np.ndarray, gen: torch.Generator | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The random part, in ``augment_order``."""
        if self.augment_order == "jitter_flip_scale_crop":
            image, label = self._flip_and_jitter(image, label, gen, jitter_first=True)
            return self._scale_and_crop(image, label, gen)
        image, label = self._scale_and_crop(image, label, gen)
        return self._flip_and_jitter(image, label, gen, jitter_first=False)

    def __call__(self, image: np.ndarray, label: np.ndarray, gen: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size is not None:
            image, label = resize(image, label, self.size)  # type: ignore[assignment]
        if self.train:
            image, label = self.augment(image, label, gen)
        target = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
        return normalize(image, self.mean, self.std), target

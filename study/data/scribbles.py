"""Scribble supervision drawn from dense ground truth, deterministically (ScribbleSup-like strokes).

Stroke rule (:func:`scribble_label`), per image, for every class ``c`` present (``ignore_index`` excluded):

1. Split the pixels of ``c`` into connected regions (4-connectivity, ``scipy.ndimage.label``).
2. Every region with at least ``min_region`` pixels gets one stroke. Its skeleton
   (``skimage.morphology.skeletonize``, 1 pixel wide, inside the region) is reduced to one long simple
   path (8-neighbour steps): from a skeleton pixel drawn with the image's RNG, the farthest skeleton
   pixel ``a``, then the path from ``a`` to the pixel farthest from ``a`` (the double-sweep estimate of
   the skeleton's longest path). A contiguous run of ``ceil(length_fraction * path length)`` pixels at
   a random offset is kept, thickened by a ``width`` x ``width`` square and clipped to the region, so a
   stroke never leaves its region.
3. A class none of whose regions reached ``min_region`` pixels still gets one labelled pixel: the
   centre-most pixel (largest distance to the region's border, ties broken by distance to the
   region's centroid) of its largest region.

Everything else becomes ``ignore_index``. Hence labelled pixels are a subset of the ground truth with
the same class, and every present class keeps at least one labelled pixel.

Expected labelled fraction (defaults ``length_fraction=0.5``, ``width=1``, ``min_region=16``): a stroke
covers about ``width * length_fraction`` times its region's longest skeleton path, so the fraction
scales with region extents rather than areas and grows as images shrink. Measured on texdigits
(``synthia`` profile, 12 training images each): 3.0 % at 128x256 (2.7-3.4 % per image), 5.4 % at
64x128, 7.4 % at 48x64; ``uniform`` profile at 128x256: 3.2 %. Real scribble sets (ScribbleSup on
PASCAL VOC) label a few per cent of the pixels.

Seeds: :func:`scribble_seed` maps (data-set fingerprint, seed, image index) to the image's RNG seed, so
the scribbles of an image do not depend on which other images are drawn or in which order.
:class:`ScribbleDataset` wraps a training split and serves (augmented image, augmented scribble map);
validation and test splits keep their full labels (do not wrap them).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections import deque
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

from study.data.base import read_image
from study.data.stats import fingerprint as _fingerprint

SCRIBBLE_VERSION = 1
_EIGHT = np.ones((3, 3), bool)


def scribble_seed(fingerprint: str, seed: int, index: int) -> int:
    """RNG seed of image ``index``: the first 8 bytes of SHA-256("fingerprint:seed:index"), as an int < 2**63."""
    digest = hashlib.sha256(f"{fingerprint}:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_options(length_fraction: float, width: int, min_region: int) -> None:
    if not (math.isfinite(length_fraction) and 0.0 < length_fraction <= 1.0):
        raise ValueError(f"length_fraction: {length_fraction!r} is not allowed (allowed: a number in (0, 1])")
    if int(width) != width or width < 1:
        raise ValueError(f"width: {width!r} is not allowed (allowed: an integer >= 1)")
    if int(min_region) != min_region or min_region < 1:
        raise ValueError(f"min_region: {min_region!r} is not allowed (allowed: an integer >= 1)")


def _bfs(skeleton: np.ndarray, start: tuple[int, int]) -> dict[tuple[int, int], tuple[int, int] | None]:
    """Breadth-first parents over the 8-connected skeleton piece holding ``start`` (insertion = visit order)."""
    h, w = skeleton.shape
    parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                q = (y + dy, x + dx)
                if 0 <= q[0] < h and 0 <= q[1] < w and skeleton[q] and q not in parent:
                    parent[q] = (y, x)
                    queue.append(q)
    return parent


def skeleton_path(skeleton: np.ndarray, start: tuple[int, int]) -> list[tuple[int, int]]:
    """A long simple path through the skeleton piece holding ``start``: from the pixel farthest from
    ``start`` (``a``) to the pixel farthest from ``a`` (the double-sweep estimate of the longest path)."""
    a = next(reversed(_bfs(skeleton, start)))
    parent = _bfs(skeleton, a)
    node: tuple[int, int] | None = next(reversed(parent))
    path = []
    while node is not None:
        path.append(node)
        node = parent[node]
    return path


def _region_stroke(region: np.ndarray, rng: np.random.Generator, length_fraction: float, width: int) -> np.ndarray:
    """Boolean stroke inside ``region`` (a cropped boolean mask): a contiguous ``length_fraction`` of a
    skeleton path at a random offset, thickened to ``width``, clipped to the region."""
    skeleton = skeletonize(region)
    ys, xs = np.nonzero(skeleton)
    if len(ys) == 0:  # cannot happen for a non-empty region, kept as a guard
        return _centre_pixel(region)
    k = int(rng.integers(len(ys)))
    path = skeleton_path(skeleton, (int(ys[k]), int(xs[k])))
    keep = max(1, math.ceil(length_fraction * len(path)))
    offset = int(rng.integers(len(path) - keep + 1))
    stroke = np.zeros_like(region)
    for p in path[offset:offset + keep]:
        stroke[p] = True
    if width > 1:
        stroke = ndimage.binary_dilation(stroke, np.ones((width, width), bool))
    return stroke & region


def _centre_pixel(region: np.ndarray) -> np.ndarray:
    """Mask of the pixel of ``region`` farthest from its border; ties go to the pixel nearest the
    region's centroid (then the first in raster order)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(region)
    to_centroid = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    best = np.lexsort((to_centroid, -dist[ys, xs]))[0]
    out = np.zeros_like(region)
    out[ys[best], xs[best]] = True
    return out


def _class_strokes(mask: np.ndarray, rng: np.random.Generator, length_fraction: float, width: int,
                   min_region: int) -> np.ndarray:
    """Strokes for all regions of one class's mask (rule steps 1-3 of the module docstring)."""
    regions, n = ndimage.label(mask)
    out = np.zeros_like(mask)
    boxes = ndimage.find_objects(regions)
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    for i, box in enumerate(boxes):
        if sizes[i] >= min_region:
            region = regions[box] == i + 1
            out[box] |= _region_stroke(region, rng, length_fraction, width)
    if not out.any():
        i = int(np.argmax(sizes))
        out[boxes[i]] |= _centre_pixel(regions[boxes[i]] == i + 1)
    return out


def scribble_label(label: np.ndarray, seed: int, ignore_index: int = 255, length_fraction: float = 0.5,
                   width: int = 1, min_region: int = 16) -> np.ndarray:
    """Scribble map of the dense ``label`` [H, W]: stroke pixels keep their class, all others become
    ``ignore_index``. Same dtype as ``label``; deterministic in (``label``, ``seed``, options).
    Stroke rule and expected labelled fraction: module docstring."""
    _check_options(length_fraction, width, min_region)
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    rng = np.random.default_rng(int(seed))
    out = np.full_like(label, ignore_index)
    for cls in np.unique(label):
        if cls == ignore_index:
            continue
        out[_class_strokes(label == cls, rng, length_fraction, width, min_region)] = cls
    return out


def labelled_fraction(dataset) -> float:
    """Labelled pixels / all pixels over ``dataset.load_target(i)`` for every index (pixel-weighted);
    ``ignore_index`` taken from ``dataset.transform.ignore_index`` (255 when absent)."""
    ignore = getattr(getattr(dataset, "transform", None), "ignore_index", 255)
    labelled = total = 0
    for i in range(len(dataset)):
        target = np.asarray(dataset.load_target(i))
        labelled += int(np.count_nonzero(target != ignore))
        total += target.size
    return labelled / total if total else 0.0


class ScribbleDataset(torch.utils.data.Dataset):
    """A :class:`~study.data.base.SegmentationDataset` whose targets are scribbles of its labels.

    The scribble of image ``i`` is drawn from ``dataset.load_target(i)`` (the label after the
    deterministic resize) with seed ``scribble_seed(fingerprint, seed, i)``, then goes through the
    dataset's transform together with the image (random scale, crop, flip apply to both). Maps are kept
    in memory and, when ``cache_dir`` is given, in ``<cache_dir>/scribbles-<key>/<i>.npy``, ``key``
    being a fingerprint of (``fingerprint``, ``seed``, options, version).
    """

    def __init__(self, dataset, fingerprint: str, seed: int, cache_dir: str | os.PathLike | None = None,
                 length_fraction: float = 0.5, width: int = 1, min_region: int = 16) -> None:
        _check_options(length_fraction, width, min_region)
        self.dataset = dataset
        self.fingerprint = str(fingerprint)
        self.seed = int(seed)
        self.options = {"length_fraction": float(length_fraction), "width": int(width),
                        "min_region": int(min_region)}
        self.key = _fingerprint({"data": self.fingerprint, "seed": self.seed, **self.options,
                                 "version": SCRIBBLE_VERSION})
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / f"scribbles-{self.key}"
        self._memory: dict[int, np.ndarray] = {}

    # the attributes other code reads from a SegmentationDataset
    samples = property(lambda self: self.dataset.samples)
    transform = property(lambda self: self.dataset.transform)
    decode_label = property(lambda self: self.dataset.decode_label)
    split = property(lambda self: self.dataset.split)
    num_classes = property(lambda self: self.dataset.num_classes)
    generator = property(lambda self: self.dataset.generator)

    def __len__(self) -> int:
        return len(self.dataset)

    def file_stats(self) -> list[tuple[str, int, int]]:
        return self.dataset.file_stats()

    def load_target(self, index: int) -> np.ndarray:
        """Scribble map of sample ``index`` (uint8 [H, W], before augmentation); cached."""
        if index in self._memory:
            return self._memory[index]
        scribble = self._read_cached(index)
        if scribble is None:
            ignore = self.dataset.transform.ignore_index
            scribble = scribble_label(self.dataset.load_target(index),
                                      scribble_seed(self.fingerprint, self.seed, index), ignore, **self.options)
            self._write_cached(index, scribble)
        self._memory[index] = scribble
        return scribble

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path = self.dataset.samples[index][0]
        transform = self.dataset.transform
        image = read_image(image_path, transform.bgr)
        scribble = self.load_target(index)
        if transform.size is None and image.shape[:2] != scribble.shape:
            raise ValueError(f"image {image_path!r} is {image.shape[1]}x{image.shape[0]} but its label is "
                             f"{scribble.shape[1]}x{scribble.shape[0]} (WxH)")
        return transform(image, scribble, self.dataset.generator)

    def _read_cached(self, index: int) -> np.ndarray | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{index}.npy"
        try:
            return np.load(path, allow_pickle=False) if path.is_file() else None
        except (OSError, ValueError, EOFError):
            return None  # unreadable cache entry: redraw and overwrite

    def _write_cached(self, index: int, scribble: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".scribble-", suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, scribble)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.cache_dir / f"{index}.npy")  # atomic for concurrent jobs
        except OSError:
            pass  # read-only location: the scribbles are still correct, just not cached

"""A segmentation data set as a list of (image file, label file) pairs plus a label decoder.

``dataset[i]`` -> (float32 [3, H, W] normalised image, int64 [H, W] class ids, ``ignore_index`` for
unlabelled pixels). The decoder turns a label file into class ids and raises ``ValueError`` naming
the file when a value is neither a class id (0..num_classes-1) nor ``ignore_index``.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from study.data.transforms import SegTransform


def read_image(path: str, bgr: bool) -> np.ndarray:
    """8-bit colour image as HxWx3 uint8, BGR (OpenCV's order) or converted to RGB."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image file {path!r}")
    return image if bgr else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_label_range(label: np.ndarray, num_classes: int, ignore_index: int, path: str) -> None:
    """Raise ValueError naming ``path`` if a value is outside 0..num_classes-1 and not ignore_index."""
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))[:10]
        raise ValueError(
            f"label file {path!r} holds class ids {values} outside 0..{num_classes - 1} "
            f"(and not the ignore index {ignore_index})")


class SegmentationDataset(Dataset):
    """Files + decoder + transform. ``generator`` (optional torch.Generator) drives augmentation;
    None uses torch's global RNG, which DataLoader workers seed from the loader's seed."""

    def __init__(self, samples: Sequence[tuple[str, str]], decode_label: Callable[[str], np.ndarray],
                 transform: SegTransform, split: str, num_classes: int,
                 generator: torch.Generator | None = None) -> None:
        self.samples = [(str(a), str(b)) for a, b in samples]
        self.decode_label = decode_label
        self.transform = transform
        self.split = split
        self.num_classes = num_classes
        self.generator = generator

    def __len__(self) -> int:
        return len(self.samples)

    def load_target(self, index: int) -> np.ndarray:
        """Label of sample ``index`` after the deterministic resize (no augmentation), uint8 [H, W]."""
        return self.transform.resize_label(self.decode_label(self.samples[index][1]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        image = read_image(image_path, self.transform.bgr)
        label = self.decode_label(label_path)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image_path!r} is {image.shape[1]}x{image.shape[0]} but its label "
                             f"{label_path!r} is {label.shape[1]}x{label.shape[0]} (WxH)")
        return self.transform(image, label, self.generator)

    def file_stats(self) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of every label and image file, for fingerprints."""
        out = []
        for pair in self.samples:
            for path in pair:
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns))
        return out

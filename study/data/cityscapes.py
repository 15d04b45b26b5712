"""Cityscapes reader: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png``; labelIds -> trainIds (19 classes, the rest 255)
through the official table in ``cityscapesscripts.helpers.labels``. A labelId the table does not
define is an error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _labels():
    try:
        from cityscapesscripts.helpers import labels
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Cityscapes labelId -> trainId table needs the package cityscapesscripts: "
                          "pip install cityscapesscripts") from e
    return labels.labels


@lru_cache(maxsize=1)
def trainid_lut() -> np.ndarray:
    """int16[256]: labelId -> trainId (255 for ignored classes), -1 for ids the table does not define."""
    lut = np.full(256, -1, np.int16)
    for label in _labels():
        if 0 <= label.id < 256:
            lut[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
    return lut


@lru_cache(maxsize=1)
def cityscapes_classes() -> tuple[str, ...]:
    """The 19 training classes in trainId order, lower case with '_' for spaces."""
    names = {l.trainId: l.name for l in _labels() if 0 <= l.trainId < 255}
    return tuple(names[i].replace(" ", "_") for i in range(len(names)))


@dataclass(frozen=True)
class CityscapesLabel:
    """Decoder: labelIds PNG -> uint8 [H, W] trainIds with 255 ignore."""

    def __call__(self, path: str) -> np.ndarray:
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise FileNotFoundError(f"cannot read Cityscapes label file {path!r}")
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise ValueError(f"Cityscapes label file {path!r} has shape {raw.shape} dtype {raw.dtype}; "
                             "expected a single-channel 8-bit labelIds PNG")
        mapped = trainid_lut()[raw]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(raw[mapped < 0]))[:10]
            raise ValueError(f"label file {path!r} holds labelIds {bad} that cityscapesscripts does not define")
        return mapped.astype(np.uint8)


def cityscapes_samples(root: str | Path, split_dir: str) -> list[tuple[str, str]]:
    """Sorted (image, labelIds) pairs of one split folder; a missing label file is an error."""
    root = Path(root)
    img_root = root / "leftImg8bit" / split_dir
    expected = (f"leftImg8bit/{split_dir}/<city>/*{IMAGE_SUFFIX} and gtFine/{split_dir}/<city>/*{LABEL_SUFFIX}")
    if not img_root.is_dir() or not (root / "gtFine" / split_dir).is_dir():
        state = "does not exist" if not root.exists() else "is incomplete"
        raise FileNotFoundError(f"Cityscapes data root {str(root)!r} {state}: expected {expected} inside it")
    out = []
    for img in sorted(img_root.glob(f"*/*{IMAGE_SUFFIX}")):
        city = img.parent.name
        lbl = root / "gtFine" / split_dir / city / (img.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
        if not lbl.is_file():
            raise FileNotFoundError(f"Cityscapes image {str(img)!r} has no label file {str(lbl)!r}")
        out.append((str(img), str(lbl)))
    return out

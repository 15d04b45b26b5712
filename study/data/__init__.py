"""Data sets: ``build_datasets(data_spec, seed) -> DataBundle``.

``data_spec`` is read by attribute (duck typing): name, root, splits, split_mode, size, void,
class_counts, mean, std, bgr, hflip, scale, crop, color_jitter, texdigits. Missing attributes take
the defaults below. The three splits yield ``(float32 [3, H, W] normalised image, int64 [H, W]
target)``; augmentation (scale, crop, flip, colour jitter) applies to the train split only.

- ``texdigits`` is generated (once, cached by its parameters) under ``root`` in the SYNTHIA-SEQS layout
  and read back through the SYNTHIA reader with its split manifest; ``seed`` does not change it
  (its own ``texdigits.seed`` does).
- ``synthia`` splits by ``split_mode`` ("paper", "by_stream", "manifest") using ``seed``.
- ``cityscapes`` uses the split folders named in ``splits``.

Class counts (``class_counts``): "train" = pixel counts of the training split; "val_first_image" =
the study's counting (validation split, first image of each batch of 6). The training split is
always counted once (cached): that pass also checks every training label's ids up front.
Normalisation: ``mean``/``std`` on 0..255 values in the channel order fed to the network (BGR when
``bgr``); None = the data set's default (synthia: the study's BGR values; cityscapes, texdigits:
ImageNet), reordered to match ``bgr``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from study.data.base import SegmentationDataset
from study.data.cityscapes import CityscapesLabel, cityscapes_classes, cityscapes_samples
from study.data.stats import class_pixel_counts, first_image_of_batches, fingerprint
from study.data.synthia import (SPLITS, SYNTHIA_CLASSES, SYNTHIA_MEAN_BGR, SYNTHIA_STD_BGR, VOID_MODES,
                                SynthiaLabel, synthia_samples)
from study.data.texdigits import TexDigitsParams, ensure_texdigits
from study.data.entries import DATASETS, data_fingerprint, num_classes_of, resolve_data
from study.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, SegTransform

CLASS_COUNT_MODES = ("train", "val_first_image")
STUDY_COUNT_BATCH = 6  # batch size of the study's validation loader, used by "val_first_image"
IGNORE_INDEX = 255

__all__ = ["DATASETS", "CLASS_COUNT_MODES", "DataBundle", "build_datasets", "data_fingerprint", "num_classes_of",
           "resolve_data", "SegmentationDataset"]


@dataclass
class DataBundle:
    train: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset
    class_names: list[str]
    num_classes: int
    class_counts: np.ndarray  # int64 [C], split per data.class_counts
    fingerprint: str  # identity of the data (files or generation parameters) and the options
    ignore_index: int = IGNORE_INDEX


def _opt(data, key: str, default):
    value = getattr(data, key, default)
    return default if value is None and default is not None else value


def _choice(value, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ValueError(f"data.{key} {value!r} is not one of {allowed}")
    return value


def _pair(value, key: str, cast):
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"data.{key} must have 2 values, got {list(value)}")
    return (cast(value[0]), cast(value[1]))


def _normalisation(data, default_mean, default_std, default_is_bgr: bool) -> tuple[tuple, tuple, bool]:
    bgr = bool(_opt(data, "bgr", default_is_bgr))
    flip = bgr != default_is_bgr
    mean = _opt(data, "mean", None)
    std = _opt(data, "std", None)
    mean = tuple(default_mean[::-1] if flip else default_mean) if mean is None else tuple(map(float, mean))
    std = tuple(default_std[::-1] if flip else default_std) if std is None else tuple(map(float, std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"data.mean/data.std need 3 values each with std > 0, got {mean} / {std}")
    return mean, std, bgr


def _cache_dir(root: Path) -> Path:
    """``<root>/.cache`` when writable, else the user's cache folder."""
    target = root / ".cache"
    if (target.is_dir() and os.access(target, os.W_OK)) or (not target.exists() and os.access(root, os.W_OK)):
        return target
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "recall-study" / "class_counts"


def build_datasets(data, seed: int) -> DataBundle:
    """Build train/val/test datasets, class names and class counts for ``data.name`` in DATASETS."""
    name = _choice(getattr(data, "name", None), tuple(DATASETS), "name")
    void = _choice(_opt(data, "void", "train"), VOID_MODES, "void")
    count_mode = _choice(_opt(data, "class_counts", "train"), CLASS_COUNT_MODES, "class_counts")
    root_opt = _opt(data, "root", "data/texdigits" if name == "texdigits" else None)
    if not root_opt:
        raise FileNotFoundError(f"data.root is not set: {name} needs the folder holding its files")
    root = Path(root_opt)
    if name in ("texdigits", "synthia"):
        if name == "texdigits":
            params = TexDigitsParams.from_spec(getattr(data, "texdigits", None))
            split_mode = "manifest"
            _, samples = synthia_samples(ensure_texdigits(root, params), split_mode, seed)
            identity: object = {"texdigits": params.key()}
            mean, std, bgr = _normalisation(data, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, False)
        else:
            split_mode = _opt(data, "split_mode", "paper")
            _, samples = synthia_samples(root, split_mode, seed)
            identity = None
            mean, std, bgr = _normalisation(data, SYNTHIA_MEAN_BGR, SYNTHIA_STD_BGR, True)
        decoder = SynthiaLabel(void=void, ignore_index=IGNORE_INDEX)
        class_names = list(SYNTHIA_CLASSES)
        options: dict = {"split_mode": split_mode, "void": void,
                         "split_seed": seed if split_mode in ("paper", "by_stream") else None}
    else:
        folders = {**{s: s for s in SPLITS}, **(getattr(data, "splits", None) or {})}
        samples = {s: cityscapes_samples(root, str(folders[s])) for s in SPLITS}
        identity = None
        decoder = CityscapesLabel()
        class_names = list(cityscapes_classes())
        mean, std, bgr = _normalisation(data, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, False)
        options = {"splits": {s: folders[s] for s in SPLITS}}
    for split in SPLITS:
        if not samples[split]:
            raise ValueError(f"{name} split {split!r} is empty (data root {str(root)!r}, options {options})")

    size = _pair(_opt(data, "size", None), "size", int)
    eval_tf = SegTransform(mean=mean, std=std, bgr=bgr, size=size, ignore_index=IGNORE_INDEX)
    train_tf = replace(eval_tf, train=True, scale=_pair(_opt(data, "scale", None), "scale", float),
                       crop=_pair(_opt(data, "crop", None), "crop", int), hflip=bool(_opt(data, "hflip", False)),
                       color_jitter=float(_opt(data, "color_jitter", 0.0)),
                       scale_set=tuple(_opt(data, "scale_set", None) or ()) or None,
                       crop_small=_opt(data, "crop_small", "pad"),
                       augment_order=_opt(data, "augment_order", "scale_crop_flip_jitter"),
                       jitter_arithmetic=_opt(data, "jitter_arithmetic", "float"))
    C = len(class_names)
    sets = {s: SegmentationDataset(samples[s], decoder, train_tf if s == "train" else eval_tf, s, C)
            for s in SPLITS}

    cache = _cache_dir(root)
    counts = class_pixel_counts(sets["train"], C, cache_dir=cache)  # also validates all training labels
    if _opt(data, "supervision", "full") == "scribble":  # counts stay those of the full labels
        from study.data.scribbles import ScribbleDataset

        sets["train"] = ScribbleDataset(sets["train"], data_fingerprint(data), int(_opt(data, "split_seed", 0) or 0),
                                        cache_dir=cache)
    if count_mode == "val_first_image":
        val = sets["val"]
        counts = class_pixel_counts(val, C, first_image_of_batches(len(val), STUDY_COUNT_BATCH), cache_dir=cache)

    if identity is None:
        identity = {s: [(p, st, mt) for p, st, mt in sets[s].file_stats()] for s in SPLITS}
    fp = fingerprint({"name": name, "data": identity, "options": options, "size": size,
                      "decoder": repr(decoder), "class_counts": count_mode})
    return DataBundle(train=sets["train"], val=sets["val"], test=sets["test"], class_names=class_names,
                      num_classes=C, class_counts=counts, fingerprint=fp)

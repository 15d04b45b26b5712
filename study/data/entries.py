"""Data set entries: each data set's own settings, checks, class count and content fingerprint.

The ``data`` section of a spec holds harness-wide options (root, size, normalisation, augmentation,
class counting) and, flat beside them, the chosen data set's own settings:

- ``texdigits``: ``texdigits`` (the generator's record, :class:`~study.data.texdigits.TexDigitsParams`)
  and ``void``;
- ``synthia``: ``split_mode`` (paper | by_stream | manifest), ``split_seed``, ``void``;
- ``cityscapes``: ``splits`` (split -> folder under leftImg8bit/gtFine).

``data_fingerprint(data)`` names what the data *is*, never where it lives: texdigits = its generator
settings; SYNTHIA / Cityscapes = the sorted relative paths and byte sizes of the image and label
files of the three splits used (listed once per process and root). The spec hash carries it in
place of ``data.root``, so the same spec on other files is another run, and a moved folder is not.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from study.components import Component, SettingError, lookup
from study.data.stats import fingerprint
from study.data.texdigits import TexDigitsParams

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _texdigits_settings(texdigits: TexDigitsParams = TexDigitsParams(),
                        void: Literal["train", "ignore"] = "train") -> None:
    """The built-in data set: generator settings and the handling of SYNTHIA's void class."""


def _synthia_settings(split_mode: Literal["paper", "by_stream", "manifest"] = "paper", split_seed: int = 0,
                      void: Literal["train", "ignore"] = "train") -> None:
    """SYNTHIA-SEQS: how the sequence is split and how void is handled."""


def _cityscapes_settings(splits: dict = DEFAULT_SPLITS) -> None:
    """Cityscapes: the folder of each split."""


def _check_splits(settings: dict) -> None:
    splits = settings["splits"]
    missing = sorted({"train", "val", "test"} - set(splits))
    if missing:
        raise SettingError("splits", f"missing {', '.join(missing)}", "a mapping with train, val, test")
    if not all(isinstance(v, str) and v for v in splits.values()):
        raise SettingError("splits", f"{splits!r} has a folder that is not a name", "folder names")


DATASETS: dict[str, Component] = {
    "texdigits": Component("texdigits", _texdigits_settings, extra={"num_classes": 16}),
    "synthia": Component("synthia", _synthia_settings, extra={"num_classes": 16}),
    "cityscapes": Component("cityscapes", _cityscapes_settings, check=_check_splits, extra={"num_classes": 19}),
}
OWN_KEYS = ("texdigits", "void", "split_mode", "split_seed", "splits")


def num_classes_of(name: str) -> int:
    return DATASETS[name].extra["num_classes"]


def _check_pair(data, key: str) -> None:
    value = getattr(data, key)
    if value is not None and (len(value) != 2 or min(value) <= 0):
        raise SettingError(key, f"{value} is not a pair of positive numbers", "[height, width] > 0")


def _check_common(data) -> None:
    """Harness-wide data options: shapes, ranges and the root."""
    _check_pair(data, "size")
    _check_pair(data, "crop")
    if data.scale is not None and (len(data.scale) != 2 or not 0 < data.scale[0] <= data.scale[1]):
        raise SettingError("scale", f"{data.scale} is not a range", "[min, max] with 0 < min <= max")
    for key in ("mean", "std"):
        v = getattr(data, key)
        if v is not None and len(v) != 3:
            raise SettingError(key, f"{v} does not have 3 values", "3 numbers, one per channel")
    if data.std is not None and min(data.std) <= 0:
        raise SettingError("std", f"{data.std} has a value <= 0", "3 numbers > 0")
    if data.scale_set is not None and (data.scale is not None or not data.scale_set or min(data.scale_set) <= 0):
        raise SettingError("scale_set", f"{data.scale_set} is not allowed" + (" together with scale" if data.scale else ""),
                           "a non-empty list of factors > 0, without data.scale")
    if not 0.0 <= data.color_jitter <= 1.0:
        raise SettingError("color_jitter", f"{data.color_jitter} is out of range", "a number in [0, 1]")
    if not data.root:
        raise SettingError("root", "is empty", "the folder of the data set")
    if Path(data.root).exists() and not Path(data.root).is_dir():
        raise SettingError("root", f"{data.root!r} is a file", "a folder")


def resolve_data(data, check_files: bool = True) -> None:
    """Resolve the data set's own settings in place (options of other data sets are refused);
    ``check_files`` also lists the data (``data_fingerprint``), refusing a folder that cannot be read."""
    entry = lookup(DATASETS, data.name, "data set")
    written = {k: getattr(data, k) for k in OWN_KEYS if getattr(data, k) is not None}
    settings = entry.resolve(written)
    for key in OWN_KEYS:
        setattr(data, key, settings.get(key))
    _check_common(data)
    if check_files:
        data_fingerprint(data)  # a folder that cannot be listed is refused now, not inside every job


def data_fingerprint(data) -> str:
    """What the data is (see the module docstring); SettingError keyed ``root`` when it cannot be read."""
    if data.name == "texdigits":
        return _texdigits_fingerprint(tuple(sorted(data.texdigits.items())))
    if data.name == "synthia":
        options = (data.split_mode, data.split_seed)
    else:
        options = tuple(sorted(data.splits.items()))
    return _files_fingerprint(data.name, os.path.realpath(data.root), options)


@functools.lru_cache(maxsize=256)
def _texdigits_fingerprint(items: tuple) -> str:
    return fingerprint({"texdigits": TexDigitsParams(**dict(items)).key()})


@functools.lru_cache(maxsize=64)
def _files_fingerprint(name: str, root: str, options: tuple) -> str:
    from study.data.cityscapes import cityscapes_samples
    from study.data.synthia import SPLITS, synthia_samples

    base = Path(root)
    if not base.is_dir():
        raise SettingError("root", f"{name} data folder {root!r} does not exist", "an existing folder")
    try:
        if name == "synthia":
            _, samples = synthia_samples(base, options[0], options[1])
        else:
            folders = dict(options)
            samples = {s: cityscapes_samples(base, str(folders[s])) for s in SPLITS}
    except (OSError, ValueError) as err:
        raise SettingError("root", str(err), f"a {name} folder in its on-disk layout") from None
    empty = [s for s in SPLITS if not samples.get(s)]
    if empty:
        raise SettingError("root", f"{name} split {empty[0]!r} under {root!r} is empty", "non-empty splits")
    listing = {s: [(os.path.relpath(p, base), os.path.getsize(p)) for pair in samples[s] for p in pair]
               for s in SPLITS}
    return fingerprint({"name": name, "files": listing})

"""Class pixel counts of a data set split, computed once and cached by a fingerprint.

counts[c] = #{labelled pixels with class c} over the chosen images, labels taken after the
deterministic resize (what the network is trained on), ignore pixels excluded. The cache file
``<cache_dir>/class_counts-<fingerprint>.json`` is keyed by the label files (path, size, mtime_ns),
the images chosen, the resize, the label decoder (void handling) and the class count, so editing or
replacing a file invalidates it.

The study's counting (the released train.py of Tian et al.) iterates the *validation*
loader in order with batch size 6 and counts only ``labels[0]`` of each batch: images 0, 6, 12, ...
of the validation split; :func:`first_image_of_batches` gives those indices.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def fingerprint(obj: Any) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_image_of_batches(n: int, batch_size: int = 6) -> list[int]:
    """Indices 0, b, 2b, ... < n: the first image of each batch of an unshuffled loader."""
    return list(range(0, n, batch_size))


def counts_fingerprint(dataset, num_classes: int, indices: Sequence[int]) -> str:
    """Fingerprint of what the counts depend on: label files, chosen images, resize, decoder, C."""
    files = []
    for i in indices:
        path = dataset.samples[i][1]
        st = os.stat(path)
        files.append((path, st.st_size, st.st_mtime_ns))
    return fingerprint({"labels": files, "size": dataset.transform.size, "decoder": repr(dataset.decode_label),
                        "num_classes": num_classes, "version": 1})


def count_pixels(dataset, num_classes: int, indices: Sequence[int]) -> np.ndarray:
    """Plain count: bincount of ``dataset.load_target(i)`` over ``indices``, ignore excluded."""
    counts = np.zeros(num_classes, np.int64)
    for i in indices:
        label = np.asarray(dataset.load_target(i)).ravel()
        counts += np.bincount(label, minlength=max(256, num_classes))[:num_classes]
    return counts


def class_pixel_counts(dataset, num_classes: int, indices: Sequence[int] | None = None,
                       cache_dir: str | Path | None = None) -> np.ndarray:
    """int64[C] pixel counts of ``dataset`` (an object with ``samples``, ``transform``, ``decode_label``
    and ``load_target``, e.g. SegmentationDataset) over ``indices`` (default: all), cached in ``cache_dir``."""
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if cache_dir is None:
        return count_pixels(dataset, num_classes, idx)
    fp = counts_fingerprint(dataset, num_classes, idx)
    path = Path(cache_dir) / f"class_counts-{fp}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fp and len(cached["counts"]) == num_classes:
                return np.asarray(cached["counts"], np.int64)
        except (ValueError, KeyError):
            pass  # unreadable cache: recount and overwrite
    counts = count_pixels(dataset, num_classes, idx)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".counts-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"fingerprint": fp, "num_classes": num_classes, "images": len(idx),
                       "split": getattr(dataset, "split", None), "counts": counts.tolist()}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: concurrent jobs never see a half-written file
    except OSError:
        pass  # read-only location: the counts are still correct, just not cached
    return counts

"""Class pixel counts: equal a plain numpy count, cached by fingerprint, invalidated by file changes,
and the study's "first image of each validation batch" counting reproduced."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
from torch.utils.data import DataLoader

from study.data import build_datasets
from study.data.stats import class_pixel_counts, first_image_of_batches

SEQ = "SYNTHIA-SEQS-05-SUMMER"
H, W = 8, 12


def write_tree(root: Path, frames: int = 20) -> list[Path]:
    """One camera, two sides; class ids (0..12, 15) in the R channel (OpenCV index 2) of 16-bit labels."""
    rng = np.random.default_rng(5)
    out = []
    for side in ("Stereo_Left", "Stereo_Right"):
        for d in ("RGB", "GT/LABELS"):
            (root / SEQ / d / side / "Omni_F").mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            rel = f"{side}/Omni_F/{f:06d}.png"
            ids = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15], (H, W),
                             p=np.r_[np.full(13, 0.07), 0.09]).astype(np.uint16)
            cv2.imwrite(str(root / SEQ / "RGB" / rel), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            cv2.imwrite(str(root / SEQ / "GT/LABELS" / rel), np.stack([ids * 0 + 9, ids * 3, ids], -1))
            out.append(root / SEQ / "GT/LABELS" / rel)
    return out


def spec(root, **kw) -> SimpleNamespace:
    base = dict(name="synthia", root=str(root), splits=None, split_mode="paper", size=None, void="train",
                class_counts="train", mean=None, std=None, bgr=True, hflip=True, scale=[0.5, 2.0], crop=[4, 4],
                color_jitter=0.4, texdigits=None)
    base.update(kw)
    return SimpleNamespace(**base)


def numpy_count(paths, size_step: int = 1) -> np.ndarray:
    counts = np.zeros(16, np.int64)
    for p in paths:
        ids = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[..., 2].astype(np.int64)
        ids = ids[size_step // 2::size_step, size_step // 2::size_step]  # centre-aligned nearest downscale
        counts += np.bincount(ids.ravel(), minlength=16)
    return counts


def test_counts_equal_plain_count_of_training_split(tmp_path):
    write_tree(tmp_path)
    b = build_datasets(spec(tmp_path), seed=1337)
    assert b.class_counts.dtype == np.int64 and b.class_counts.shape == (16,)
    np.testing.assert_array_equal(b.class_counts, numpy_count([l for _, l in b.train.samples]))
    assert len(b.train) == 2 * 14  # int(0.7 * 20) per stream; augmentation does not enter the counts
    # with a resize to half size (nearest, pixel centres) the counts follow the resized labels
    half = build_datasets(spec(tmp_path, size=[H // 2, W // 2]), seed=1337)
    np.testing.assert_array_equal(half.class_counts, numpy_count([l for _, l in half.train.samples], 2))
    ignored = build_datasets(spec(tmp_path, void="ignore"), seed=1337)
    assert ignored.class_counts[0] == 0
    np.testing.assert_array_equal(ignored.class_counts[1:], b.class_counts[1:])


def test_val_first_image_reproduces_study_loop(tmp_path):
    write_tree(tmp_path, frames=40)  # 4 validation frames per stream, 8 in all -> batches of 6: images 0 and 6
    b = build_datasets(spec(tmp_path, class_counts="val_first_image"), seed=1337)
    # the released train.py: iterate the unshuffled validation loader (batch 6), count labels[0] per class
    ref = np.zeros(16)
    for _, labels in DataLoader(b.val, batch_size=6, shuffle=False):
        for i in range(16):
            ref[i] += (labels[0] == i).sum().item()
    assert len(b.val) == 8 and first_image_of_batches(8) == [0, 6]
    np.testing.assert_array_equal(b.class_counts, ref.astype(np.int64))
    train = build_datasets(spec(tmp_path), seed=1337).class_counts
    assert train.sum() == len(b.train) * H * W and b.class_counts.sum() == 2 * H * W


def test_cache_reused_and_invalidated(tmp_path):
    paths = write_tree(tmp_path)
    b = build_datasets(spec(tmp_path), seed=0)
    cache = tmp_path / ".cache"
    files = list(cache.glob("class_counts-*.json"))
    assert len(files) == 1
    ds = b.train

    def boom(i):
        raise AssertionError("cache not used")

    ds.load_target = boom  # a recount would call this
    np.testing.assert_array_equal(class_pixel_counts(ds, 16, cache_dir=cache), b.class_counts)
    del ds.load_target

    victim = Path(ds.samples[0][1])
    raw = cv2.imread(str(victim), cv2.IMREAD_UNCHANGED)
    raw[..., 2] = 15
    cv2.imwrite(str(victim), raw)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b2 = build_datasets(spec(tmp_path), seed=0)
    np.testing.assert_array_equal(b2.class_counts, numpy_count([l for _, l in b2.train.samples]))
    assert not np.array_equal(b2.class_counts, b.class_counts)
    assert len(list(cache.glob("class_counts-*.json"))) == 2
    assert b2.fingerprint != b.fingerprint


def test_no_cache_dir_counts_directly(tmp_path):
    write_tree(tmp_path, frames=10)
    b = build_datasets(spec(tmp_path), seed=0)
    idx = [0, 3, 5]
    ref = numpy_count([b.train.samples[i][1] for i in idx])
    np.testing.assert_array_equal(class_pixel_counts(b.train, 16, indices=idx), ref)

"""Cityscapes reader on a fixture tree (two cities, labelIds PNGs); trainIds checked against cityscapesscripts."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from study.data import build_datasets
from study.data.cityscapes import CityscapesLabel

labels_mod = pytest.importorskip("cityscapesscripts.helpers.labels")

H, W = 7, 10  # 70 pixels: every labelId 0..33 appears at least twice
CITIES = ("aachen", "bochum")


def write_cityscapes(root: Path, per_city: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> frames per city; returns {label path: (rgb image, labelIds)}."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in per_city.items():
        for city in CITIES:
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for f in range(n):
                stem = f"{city}_{f:06d}_000019"
                rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                ids = rng.permutation(np.arange(H * W) % 34).reshape(H, W).astype(np.uint8)
                assert cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"),
                                   cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                lbl = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                assert cv2.imwrite(str(lbl), ids)
                out[str(lbl)] = (rgb, ids)
    return out


def spec(root, **kw) -> SimpleNamespace:
    base = dict(name="cityscapes", root=str(root), splits={"train": "train", "val": "val", "test": "test"},
                split_mode="paper", size=None, void="train", class_counts="train", mean=[0.0] * 3, std=[1.0] * 3,
                bgr=False, hflip=False, scale=None, crop=None, color_jitter=0.0, texdigits=None)
    base.update(kw)
    return SimpleNamespace(**base)


def reference_trainids(ids: np.ndarray) -> np.ndarray:
    """Per pixel through cityscapesscripts' id2label; trainId 255 or -1 -> 255."""
    out = np.empty(ids.shape, np.int64)
    for (r, c), v in np.ndenumerate(ids):
        t = labels_mod.id2label[int(v)].trainId
        out[r, c] = 255 if t in (255, -1) else t
    return out


@pytest.fixture()
def tree(tmp_path):
    return tmp_path, write_cityscapes(tmp_path, {"train": 2, "val": 1, "test": 1})


def test_trainids_match_cityscapesscripts_for_every_labelid(tree):
    root, truth = tree
    b = build_datasets(spec(root), seed=0)
    assert b.num_classes == 19 and b.ignore_index == 255
    assert b.class_names == [labels_mod.trainId2label[i].name.replace(" ", "_") for i in range(19)]
    assert (len(b.train), len(b.val), len(b.test)) == (4, 2, 2)
    assert {Path(p).parent.name for _, p in b.train.samples} == set(CITIES)
    seen = set()
    for ds in (b.train, b.val, b.test):
        for i in range(len(ds)):
            x, y = ds[i]
            rgb, ids = truth[ds.samples[i][1]]
            seen |= set(np.unique(ids).tolist())
            np.testing.assert_array_equal(y.numpy(), reference_trainids(ids))
            np.testing.assert_array_equal(x.numpy(), rgb.transpose(2, 0, 1).astype(np.float32))
    assert seen == set(range(34))
    # class counts of the training split against a plain count of the mapped labels
    ref = np.zeros(19, np.int64)
    for _, lbl in b.train.samples:
        t = reference_trainids(truth[lbl][1])
        ref += np.bincount(t[t != 255], minlength=19)
    np.testing.assert_array_equal(b.class_counts, ref)


def test_split_folder_names_and_imagenet_default(tree):
    root, truth = tree
    b = build_datasets(spec(root, splits={"train": "train", "val": "val", "test": "val"}, mean=None, std=None),
                       seed=0)
    assert b.test.samples == b.val.samples
    x, _ = b.val[0]
    rgb = truth[b.val.samples[0][1]][0].astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    np.testing.assert_allclose(x.numpy(), ((rgb - mean) / std).transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_missing_root_and_missing_label(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*leftImg8bit/train"):
        build_datasets(spec(tmp_path / "nope"), seed=0)
    truth = write_cityscapes(tmp_path, {"train": 1, "val": 1, "test": 1})
    victim = Path(next(iter(truth)))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        build_datasets(spec(tmp_path), seed=0)


def test_empty_split_named(tmp_path):
    write_cityscapes(tmp_path, {"train": 1, "val": 0, "test": 1})
    with pytest.raises(ValueError, match="'val' is empty"):
        build_datasets(spec(tmp_path), seed=0)


def test_undefined_labelid_named(tree):
    root, truth = tree
    lbl = next(p for p in truth if "/train/" in p)
    ids = truth[lbl][1].copy()
    ids[0, 0] = 200
    assert cv2.imwrite(lbl, ids)
    with pytest.raises(ValueError, match=rf"{Path(lbl).name}.*\[200\]"):
        build_datasets(spec(root), seed=0)
    with pytest.raises(ValueError, match=Path(lbl).name):
        CityscapesLabel()(lbl)

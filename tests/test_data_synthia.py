"""SYNTHIA-SEQS reader on a fixture tree written here in the real format (16-bit 3-channel label PNGs)."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from study.data import build_datasets
from study.data.synthia import SEQUENCE, SynthiaLabel, synthia_samples

SIDES = ("Stereo_Left", "Stereo_Right")
H, W = 6, 10
PRESENT = [c for c in range(16) if c not in (13, 14)]


def write_synthia(root: Path, cameras=("Omni_B", "Omni_F", "Omni_L"), frames: int = 10, seed: int = 0) -> dict:
    """Write RGB + GT/LABELS for every side x camera; returns {rel path: (bgr image, class ids)}.

    Channels 0 and 1 of the label hold values that are not class ids (0: 300 + id, 1: instance 77 + id),
    so reading any channel but index 2 gives wrong or out-of-range ids."""
    rng = np.random.default_rng(seed)
    out = {}
    for cam in cameras:
        for side in SIDES:
            for d in ("RGB", "GT/LABELS"):
                (root / SEQUENCE / d / side / cam).mkdir(parents=True, exist_ok=True)
            for f in range(frames):
                rel = f"{side}/{cam}/{f:06d}.png"
                bgr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                ids = rng.choice(PRESENT, (H, W)).astype(np.uint16)
                lbl = np.stack([300 + ids, 77 + ids, ids], -1).astype(np.uint16)
                assert cv2.imwrite(str(root / SEQUENCE / "RGB" / rel), bgr)
                assert cv2.imwrite(str(root / SEQUENCE / "GT/LABELS" / rel), lbl)
                out[rel] = (bgr, ids.astype(np.int64))
    return out


def spec(root, **kw) -> SimpleNamespace:
    base = dict(name="synthia", root=str(root), splits=None, split_mode="paper", size=None, void="train",
                class_counts="train", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], bgr=True, hflip=False,
                scale=None, crop=None, color_jitter=0.0, texdigits=None)
    base.update(kw)
    return SimpleNamespace(**base)


def rel_of(path: str) -> str:
    return "/".join(Path(path).parts[-3:])


@pytest.fixture()
def tree(tmp_path):
    return tmp_path, write_synthia(tmp_path)


def test_written_fixture_is_16bit_with_id_in_red(tree):
    root, truth = tree
    rel = next(iter(truth))
    raw = cv2.imread(str(root / SEQUENCE / "GT/LABELS" / rel), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (H, W, 3)
    np.testing.assert_array_equal(raw[..., 2], truth[rel][1])


def test_loader_shapes_labels_and_images(tree):
    root, truth = tree
    b = build_datasets(spec(root), seed=1337)
    assert b.num_classes == 16 and len(b.class_names) == 16 and b.ignore_index == 255
    assert b.class_names[15] == "traffic_light" and b.class_names[0] == "void"
    n = sum(len(s) for s in (b.train, b.val, b.test))
    assert n == len(truth)
    for ds in (b.train, b.val, b.test):
        for i in range(len(ds)):
            x, y = ds[i]
            bgr, ids = truth[rel_of(ds.samples[i][1])]
            assert x.shape == (3, H, W) and x.dtype == torch.float32
            assert y.shape == (H, W) and y.dtype == torch.int64
            np.testing.assert_array_equal(y.numpy(), ids)  # channel index 2, not 0 (300+) or 1 (77+)
            np.testing.assert_array_equal(x.numpy(), bgr.transpose(2, 0, 1).astype(np.float32))


def test_rgb_order_and_default_normalisation(tree):
    root, truth = tree
    b = build_datasets(spec(root, bgr=False), seed=0)
    x, _ = b.val[0]
    bgr, _ = truth[rel_of(b.val.samples[0][1])]
    np.testing.assert_array_equal(x.numpy(), bgr[..., ::-1].transpose(2, 0, 1).astype(np.float32))
    # default: the study's mean/std, given in BGR order, applied to BGR input
    b = build_datasets(spec(root, mean=None, std=None, bgr=True), seed=0)
    x, _ = b.val[0]
    mean = np.array([55.09944, 62.203827, 71.23802], np.float32)
    std = np.array([49.56111, 51.497387, 55.363934], np.float32)
    ref = ((bgr.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-6)
    # the same physical normalisation when the network is fed RGB
    b = build_datasets(spec(root, mean=None, std=None, bgr=False), seed=0)
    np.testing.assert_allclose(b.val[0][0].numpy(), ref[::-1], rtol=1e-6, atol=1e-6)


def test_void_train_vs_ignore(tree):
    root, truth = tree
    kept = build_datasets(spec(root, void="train"), seed=0)
    ignored = build_datasets(spec(root, void="ignore"), seed=0)
    for i in range(len(kept.train)):
        ids = truth[rel_of(kept.train.samples[i][1])][1]
        a, b = kept.train[i][1].numpy(), ignored.train[i][1].numpy()
        assert (ids == 0).any()
        np.testing.assert_array_equal(a, ids)
        np.testing.assert_array_equal(b, np.where(ids == 0, 255, ids))
    assert kept.class_counts[0] > 0 and ignored.class_counts[0] == 0
    np.testing.assert_array_equal(kept.class_counts[1:], ignored.class_counts[1:])


def test_paper_split_per_stream_70_10_20_and_seeded(tree):
    root, truth = tree
    _, s1 = synthia_samples(root, "paper", 1337)
    _, s2 = synthia_samples(root, "paper", 1337)
    _, s3 = synthia_samples(root, "paper", 7)
    assert s1 == s2
    names = {k: [rel_of(l) for _, l in v] for k, v in s1.items()}
    names3 = {k: [rel_of(l) for _, l in v] for k, v in s3.items()}
    assert set(names["train"]) != set(names3["train"])
    all_names = names["train"] + names["val"] + names["test"]
    assert sorted(all_names) == sorted(truth) and len(set(all_names)) == len(all_names)
    streams = {"/".join(r.split("/")[:2]) for r in truth}
    assert len(streams) == 6
    for stream in streams:
        per = {k: [r for r in v if r.startswith(stream + "/")] for k, v in names.items()}
        assert (len(per["train"]), len(per["val"]), len(per["test"])) == (7, 1, 2)
        # the released procedure: frames (here sorted) shuffled by random.seed(seed) per stream
        frames = sorted(r for r in truth if r.startswith(stream + "/"))
        random.Random(1337).shuffle(frames)
        assert per["train"] == frames[:7] and per["val"] == frames[7:8] and per["test"] == frames[8:]


def test_by_stream_split_is_leak_free(tree):
    root, truth = tree
    for seed in (0, 1, 2, 3):
        _, s = synthia_samples(root, "by_stream", seed)
        cams = {k: {Path(l).parts[-2] for _, l in v} for k, v in s.items()}
        streams = {k: {"/".join(Path(l).parts[-3:-1]) for _, l in v} for k, v in s.items()}
        assert all(cams[k] for k in cams)  # no empty split
        assert not (cams["train"] & cams["val"] or cams["train"] & cams["test"] or cams["val"] & cams["test"])
        assert not (streams["train"] & streams["val"] or streams["train"] & streams["test"]
                    or streams["val"] & streams["test"])
        # both stereo sides of a camera stay together, every frame used once
        for k in s:
            for cam in cams[k]:
                assert {f"{side}/{cam}" for side in SIDES} <= streams[k]
        assert sorted(rel_of(l) for v in s.values() for _, l in v) == sorted(truth)


def test_missing_root_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*RGB"):
        build_datasets(spec(missing), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*GT/LABELS"):
        build_datasets(spec(tmp_path / "empty"), seed=0)


def test_empty_split_is_named(tmp_path):
    write_synthia(tmp_path, frames=2)  # int(0.1 * 2) = 0 validation frames per stream
    with pytest.raises(ValueError, match="'val' is empty"):
        build_datasets(spec(tmp_path), seed=0)


def test_unknown_options_name_allowed_values(tree):
    root, _ = tree
    with pytest.raises(ValueError, match="split_mode.*'paper'"):
        build_datasets(spec(root, split_mode="random"), seed=0)
    with pytest.raises(ValueError, match="void.*'ignore'"):
        build_datasets(spec(root, void="drop"), seed=0)
    with pytest.raises(ValueError, match="name.*'texdigits'"):
        build_datasets(spec(root, name="kitti"), seed=0)


def test_out_of_range_label_named_at_start_and_lazily(tree):
    root, _ = tree
    _, s = synthia_samples(root, "paper", 0)
    bad = s["train"][3][1]
    lbl = cv2.imread(bad, cv2.IMREAD_UNCHANGED)
    lbl[2, 3, 2] = 20
    assert cv2.imwrite(bad, lbl)
    with pytest.raises(ValueError, match=rf"{Path(bad).name}.*\[20\]"):
        build_datasets(spec(root), seed=0)  # the class-count pass over the training split
    with pytest.raises(ValueError, match=Path(bad).name):
        SynthiaLabel()(bad)
    # 255 is the ignore index, not an error
    lbl[2, 3, 2] = 255
    assert cv2.imwrite(bad, lbl)
    b = build_datasets(spec(root), seed=0)
    i = [l for _, l in b.train.samples].index(bad)
    assert b.train[i][1][2, 3] == 255


def test_manifest_split(tree):
    root, truth = tree
    rels = sorted(truth)
    (root / SEQUENCE / "splits.json").write_text(
        '{"train": ["%s", "%s"], "val": ["%s"], "test": ["%s"]}' % tuple(rels[:4]))
    _, s = synthia_samples(root, "manifest", 0)
    assert [rel_of(l) for _, l in s["train"]] == rels[:2]
    assert [rel_of(l) for _, l in s["test"]] == rels[3:4]
    (root / SEQUENCE / "splits.json").write_text('{"train": ["Stereo_Left/Omni_B/999999.png"]}')
    with pytest.raises(FileNotFoundError, match="999999"):
        synthia_samples(root, "manifest", 0)


def test_resize_and_train_augmentation(tree):
    root, _ = tree
    b = build_datasets(spec(root, size=[12, 20], crop=[8, 8], hflip=True, scale=[1.0, 1.5]), seed=0)
    x, y = b.train[0]
    assert x.shape == (3, 8, 8) and y.shape == (8, 8)
    x, y = b.val[0]
    assert x.shape == (3, 12, 20) and y.shape == (12, 20)
    # nearest-neighbour upscaling by 2: every label pixel repeated
    raw = cv2.imread(b.val.samples[0][1], cv2.IMREAD_UNCHANGED)[..., 2]
    np.testing.assert_array_equal(y.numpy()[::2, ::2], raw)

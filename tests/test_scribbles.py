"""Scribble synthesis: strokes are a subset of the ground truth lying on region skeletons, every present
class keeps a labelled pixel, the labelled fraction matches the documented bounds on texdigits images,
the draw is deterministic in (fingerprint, seed, index), and the dataset wrapper caches and augments."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from study.data import build_datasets
from study.data.scribbles import (ScribbleDataset, labelled_fraction, scribble_label, scribble_seed,
                                  skeleton_path)
from study.data.texdigits import TexDigitsParams, render_sample

IGNORE = 255


def texdigits_labels(n: int, height: int, width: int, profile: str = "synthia") -> list[np.ndarray]:
    params = TexDigitsParams(height=height, width=width, profile=profile, seed=1)
    return [render_sample(params, "train", i)[1] for i in range(n)]


def synthetic_label() -> np.ndarray:
    """Big blocks, an ignore band, a 1-pixel class, a 3-pixel class and a 1-pixel-wide line."""
    lab = np.zeros((40, 60), np.uint8)
    lab[:, 30:] = 1
    lab[20:, :20] = 2
    lab[5:8, 35:50] = IGNORE
    lab[30, 40] = 3  # 1 pixel
    lab[10, 5:8] = 4  # 3 pixels in a row
    lab[2:38, 25] = 5  # thin line, 36 pixels
    return lab


@pytest.mark.parametrize("label", [synthetic_label(), *texdigits_labels(3, 64, 128)])
def test_scribble_is_subset_of_ground_truth_with_every_class(label):
    s = scribble_label(label, seed=7)
    on = s != IGNORE
    assert on.any()
    assert np.array_equal(s[on], label[on])  # same class where labelled
    assert not np.any(on & (label == IGNORE))
    present = set(np.unique(label).tolist()) - {IGNORE}
    assert present == set(np.unique(s[on]).tolist())


def test_width_one_strokes_lie_on_the_skeleton_and_are_connected_per_region():
    label = texdigits_labels(1, 128, 256)[0]
    s = scribble_label(label, seed=3, width=1)
    for cls in np.unique(label):
        regions, n = ndimage.label(label == cls)
        skel = np.zeros_like(regions, bool)
        for r in range(1, n + 1):
            skel |= skeletonize(regions == r)
        stroke = s == cls
        sizes = np.bincount(regions.ravel())[1:]
        if (sizes >= 16).any():  # centre-pixel fallback is not on the skeleton necessarily
            assert np.all(skel[stroke])
        for r in range(1, n + 1):
            part = stroke & (regions == r)
            if part.any():
                assert ndimage.label(part, np.ones((3, 3)))[1] == 1


def test_stroke_length_is_the_fraction_of_a_straight_bar():
    label = np.full((9, 80), IGNORE, np.uint8)
    label[2:7, 5:75] = 0  # 5 x 70 bar: its skeleton is a horizontal line
    skel_len = int(skeletonize(label == 0).sum())
    for frac in (0.25, 0.5, 1.0):
        s = scribble_label(label, seed=0, length_fraction=frac, width=1)
        assert (s == 0).sum() == int(np.ceil(frac * skel_len))
    s3 = scribble_label(label, seed=0, length_fraction=0.5, width=3)
    assert (s3 == 0).sum() == 3 * (int(np.ceil(0.5 * skel_len)) + 2)  # a 3x3 square around each stroke pixel


def test_skeleton_path_is_a_simple_8_connected_path_between_far_ends():
    skel = np.zeros((7, 7), bool)
    skel[3, :] = True  # a plus sign: longest path has 7 pixels
    skel[:, 3] = True
    path = skeleton_path(skel, (3, 3))
    assert len(path) == 7 and len(set(path)) == 7
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1 for a, b in zip(path, path[1:]))
    ends = {path[0], path[-1]}
    assert ends <= {(0, 3), (6, 3), (3, 0), (3, 6)}


def test_tiny_classes_get_their_centre_pixel():
    s = scribble_label(synthetic_label(), seed=1)
    assert s[30, 40] == 3
    assert (s == 4).sum() == 1 and s[10, 6] == 4  # centre of the 3-pixel row


@pytest.mark.parametrize("height,width,low,high", [(128, 256, 0.015, 0.06), (64, 128, 0.03, 0.09)])
def test_labelled_fraction_within_documented_bounds_on_texdigits(height, width, low, high):
    fractions = [float((scribble_label(lab, i) != IGNORE).mean())
                 for i, lab in enumerate(texdigits_labels(4, height, width))]
    assert all(low <= f <= high for f in fractions), fractions


def test_same_seed_same_scribbles_different_seed_different():
    label = texdigits_labels(1, 64, 128)[0]
    a = scribble_label(label, seed=scribble_seed("fp", 0, 5))
    b = scribble_label(label, seed=scribble_seed("fp", 0, 5))
    c = scribble_label(label, seed=scribble_seed("fp", 1, 5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_scribble_seed_is_a_pure_function_of_its_three_inputs():
    base = scribble_seed("abc", 0, 0)
    assert base == scribble_seed("abc", 0, 0)
    assert 0 <= base < 2 ** 63
    assert len({base, scribble_seed("abd", 0, 0), scribble_seed("abc", 1, 0), scribble_seed("abc", 0, 1)}) == 4


@pytest.mark.parametrize("kw,name", [({"length_fraction": 0.0}, "length_fraction"), ({"width": 0}, "width"),
                                      ({"min_region": 0}, "min_region"),
                                      ({"length_fraction": float("nan")}, "length_fraction")])
def test_bad_options_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        scribble_label(synthetic_label(), 0, **kw)


def _bundle(tmp_path, **data):
    spec = SimpleNamespace(name="texdigits", root=str(tmp_path / "data"), size=None, hflip=False, scale=None,
                           crop=None, color_jitter=0.0,
                           texdigits={"num_train": 3, "num_val": 1, "num_test": 1, "height": 48, "width": 64})
    for k, v in data.items():
        setattr(spec, k, v)
    return build_datasets(spec, seed=0)


def test_dataset_wrapper_serves_scribbles_and_caches_them(tmp_path):
    bundle = _bundle(tmp_path)
    cache = tmp_path / "cache"
    wrapped = ScribbleDataset(bundle.train, bundle.fingerprint, seed=2, cache_dir=cache)
    for i in range(len(wrapped)):
        image, target = wrapped[i]
        full_image, full = bundle.train[i]
        assert np.array_equal(image.numpy(), full_image.numpy())  # no augmentation here
        t, f = target.numpy(), full.numpy()
        on = t != IGNORE
        assert on.any() and np.array_equal(t[on], f[on])
        assert np.array_equal(t, scribble_label(bundle.train.load_target(i),
                                                scribble_seed(bundle.fingerprint, 2, i)))
    files = sorted(p.name for p in cache.glob("scribbles-*/*.npy"))
    assert files == ["0.npy", "1.npy", "2.npy"]
    again = ScribbleDataset(bundle.train, bundle.fingerprint, seed=2, cache_dir=cache)
    next(cache.glob("scribbles-*/0.npy")).write_bytes(b"")  # a broken entry is redrawn
    assert np.array_equal(again.load_target(0), wrapped.load_target(0))
    assert np.array_equal(again.load_target(1), wrapped.load_target(1))
    sentinel = np.full((48, 64), 7, np.uint8)  # proves the disk entry is what gets served
    np.save(next(cache.glob("scribbles-*/2.npy")), sentinel)
    assert np.array_equal(again.load_target(2), sentinel)
    other = ScribbleDataset(bundle.train, bundle.fingerprint, seed=3, cache_dir=cache)
    assert other.key != wrapped.key


def test_dataset_wrapper_augments_image_and_scribble_together(tmp_path):
    bundle = _bundle(tmp_path, hflip=True, crop=[32, 40], scale=[0.75, 1.25])
    wrapped = ScribbleDataset(bundle.train, bundle.fingerprint, seed=0)
    import torch
    bundle.train.generator = torch.Generator().manual_seed(11)
    _, full = bundle.train[1]
    bundle.train.generator = torch.Generator().manual_seed(11)
    _, scribble = wrapped[1]
    assert scribble.shape == full.shape == (32, 40)
    on = scribble != IGNORE
    assert on.any() and torch.equal(scribble[on], full[on])


def test_labelled_fraction_counts_non_ignored_pixels(tmp_path):
    bundle = _bundle(tmp_path)
    wrapped = ScribbleDataset(bundle.train, bundle.fingerprint, seed=0)
    expected = np.mean([(wrapped.load_target(i) != IGNORE).mean() for i in range(3)])  # equal-size images
    assert labelled_fraction(wrapped) == pytest.approx(expected)
    assert labelled_fraction(bundle.train) > 0.9 > 0.2 > labelled_fraction(wrapped) > 0

"""Joint transforms keep image and label aligned, are deterministic per generator, and normalise correctly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from study.data.transforms import SegTransform, color_jitter, random_crop, random_hflip, resize

H, W, B = 48, 80, 8  # 8x8 blocks of constant class


def blocky(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label of 8x8 blocks with ids 0..15; image channel 0 = 10 * id + 5 (so id is readable from the image),
    channels 1/2 vary with position so flips/crops that misplace pixels are caught."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 16, (H // B, W // B)), np.ones((B, B), np.int64)).astype(np.uint8)
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = label * 10 + 5
    image[..., 1] = np.arange(W)[None, :] * 3
    image[..., 2] = np.arange(H)[:, None] * 5
    return image, label


def ident(**kw) -> SegTransform:
    return SegTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=True, train=True, **kw)


def label_from_image(x: torch.Tensor) -> np.ndarray:
    return np.round((x[0].numpy() - 5) / 10).astype(np.int64)


def test_crop_and_flip_are_exact():
    image, label = blocky()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x, y = ident(crop=(32, 40), hflip=True)(image, label, g)
        assert x.shape == (3, 32, 40) and y.shape == (32, 40)
        np.testing.assert_array_equal(label_from_image(x), y.numpy())
        # the crop is a window of the (possibly flipped) original: find it by the position channels
        cols = x[1, 0].numpy() / 3
        rows = x[2, :, 0].numpy() / 5
        assert np.all(np.abs(np.diff(cols)) == 1) and np.all(np.diff(rows) == 1)
        flipped = cols[1] < cols[0]
        src = label[:, ::-1] if flipped else label
        c0 = int(W - 1 - cols[0]) if flipped else int(cols[0])
        np.testing.assert_array_equal(y.numpy(), src[int(rows[0]):int(rows[0]) + 32, c0:c0 + 40])


def test_crop_pads_with_ignore_and_zero():
    image, label = blocky()
    x, y = random_crop(image, label, (64, 100), torch.Generator().manual_seed(0), ignore_index=255)
    assert x.shape == (64, 100, 3) and y.shape == (64, 100)
    pad = y == 255
    assert pad.sum() == 64 * 100 - H * W
    assert (x[pad] == 0).all()
    np.testing.assert_array_equal(y[:H, :W], label)


def test_scale_crop_flip_keep_alignment():
    """Two classes drawn as 0 / 250 in channel 0: a bilinear pixel that is exactly 0 or 250 lies inside one
    block, and the nearest-neighbour label must name that block (a half-pixel grid shift fails this)."""
    rng = np.random.default_rng(1)
    label = np.kron(rng.integers(0, 2, (H // B, W // B)), np.ones((B, B), np.int64)).astype(np.uint8) * 7
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = (label > 0) * 250
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x, y = ident(scale=(0.5, 2.0), crop=(40, 40), hflip=True)(image, label, g)
        x0, y = x[0].numpy(), y.numpy()
        valid = y != 255
        assert (x.numpy()[:, ~valid] == 0).all()  # padding: image zero where label is ignore
        pure = valid & ((x0 == 0) | (x0 == 250))
        assert pure.sum() > 0.6 * valid.sum()
        np.testing.assert_array_equal(np.where(x0[pure] == 250, 7, 0), y[pure])


def test_same_generator_same_output_and_different_seed_differs():
    image, label = blocky()
    t = ident(scale=(0.75, 1.5), crop=(32, 32), hflip=True, color_jitter=0.5)
    a = t(image, label, torch.Generator().manual_seed(3))
    b = t(image, label, torch.Generator().manual_seed(3))
    c = t(image, label, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    torch.manual_seed(11)  # generator None: torch's global RNG (what DataLoader workers seed)
    d = t(image, label, None)
    torch.manual_seed(11)
    e = t(image, label, None)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_eval_transform_ignores_augmentation_options():
    image, label = blocky()
    t = SegTransform(mean=(0.0,) * 3, std=(1.0,) * 3, scale=(0.5, 2.0), crop=(8, 8), hflip=True,
                     color_jitter=0.9, train=False)
    x, y = t(image, label, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(y.numpy(), label)
    np.testing.assert_array_equal(x.numpy(), image.transpose(2, 0, 1))


def test_color_jitter_changes_image_only():
    image, label = blocky()
    g = torch.Generator().manual_seed(0)
    out = color_jitter(image, 0.5, g)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    np.testing.assert_array_equal(color_jitter(image, 0.0, g), image)
    x, y = ident(color_jitter=0.5)(image, label, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(y.numpy(), label)


def test_hflip_probability_and_resize_nearest():
    image, label = blocky()
    g = torch.Generator().manual_seed(0)
    n = sum(not np.array_equal(random_hflip(image, label, g)[1], label) for _ in range(400))
    assert 150 < n < 250
    _, lab2 = resize(image, label, (H * 2, W * 2))
    np.testing.assert_array_equal(lab2[::2, ::2], label)
    assert set(np.unique(resize(None, label, (17, 23))[1])) <= set(np.unique(label))


@pytest.mark.parametrize("bgr", [True, False])
def test_normalisation_matches_torchvision(bgr):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    mean, std = (55.1, 62.2, 71.2), (49.6, 51.5, 55.4)
    x, _ = SegTransform(mean=mean, std=std, bgr=bgr)(image, np.zeros((9, 11), np.uint8))
    ref = TF.normalize(torch.from_numpy(image).permute(2, 0, 1).float(), list(mean), list(std))
    torch.testing.assert_close(x, ref)

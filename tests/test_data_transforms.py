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


# ----------------------------------------------------------------------------- released Cityscapes switches


def two_class() -> tuple[np.ndarray, np.ndarray]:
    """Blocks of classes 0 / 7 drawn as 0 / 250 in channel 0 (see test_scale_crop_flip_keep_alignment)."""
    rng = np.random.default_rng(1)
    label = np.kron(rng.integers(0, 2, (H // B, W // B)), np.ones((B, B), np.int64)).astype(np.uint8) * 7
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = (label > 0) * 250
    return image, label


def assert_aligned(x: torch.Tensor, y: torch.Tensor) -> None:
    """Pixels whose bilinear value is pure 0 / 250 lie inside one block; the label must name it."""
    x0, y = x[0].numpy(), y.numpy()
    pure = (y != 255) & ((x0 == 0) | (x0 == 250))
    assert pure.sum() > 0.6 * (y != 255).sum()
    np.testing.assert_array_equal(np.where(x0[pure] == 250, 7, 0), y[pure])


def test_scale_set_draws_each_listed_factor_and_nothing_else():
    image, label = two_class()
    scales = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    seen = set()
    for seed in range(120):
        x, y = ident(scale_set=scales)(image, label, torch.Generator().manual_seed(seed))
        hw = tuple(y.shape)
        matches = [s for s in scales if hw == (round(H * s), round(W * s))]
        assert len(matches) == 1, hw
        seen.add(matches[0])
        assert_aligned(x, y)
    assert seen == set(scales)
    counts = {}
    for seed in range(600):
        s = ident(scale_set=(1.0, 2.0))(image, label, torch.Generator().manual_seed(seed))[1].shape[0] // H
        counts[s] = counts.get(s, 0) + 1
    assert abs(counts[1] - 300) < 60  # uniform over the list (binomial sd ~12)


def test_crop_upscales_a_small_image_as_released():
    image, label = two_class()  # 48 x 80 (landscape: w >= h), crop 64 x 100 -> factor 64 / 48
    for seed in range(5):
        x, y = ident(crop=(64, 100), crop_small="upscale")(image, label, torch.Generator().manual_seed(seed))
        assert y.shape == (64, 100) and not (y == 255).any()  # nothing padded
        assert_aligned(x, y)
    # the enlarged image before the crop: int(f h + 1) x int(f w + 1) with f = 64 / 48
    from study.data.transforms import upscale_to_crop
    big_image, big_label = upscale_to_crop(image, label, (64, 100))
    assert big_label.shape == (int(64 / 48 * 48 + 1), int(64 / 48 * 80 + 1)) == (65, 107)
    assert big_image.shape[:2] == big_label.shape
    # portrait image, crop wider than it: f = W_crop / w
    tall_image, tall_label = image.transpose(1, 0, 2).copy(), label.T.copy()  # 80 x 48
    _, up = upscale_to_crop(tall_image, tall_label, (60, 60))
    assert up.shape == (int(60 / 48 * 80 + 1), int(60 / 48 * 48 + 1))
    # an image that covers the crop is cropped as with padding (same generator, same window)
    for mode in ("pad", "upscale"):
        x, y = ident(crop=(32, 40), crop_small=mode)(image, label, torch.Generator().manual_seed(3))
        if mode == "pad":
            ref = y
        else:
            torch.testing.assert_close(y, ref)


def _manual(image, label, gen, steps):
    """Apply the module's building blocks in the given order (strength 0.5 jitter, crop 32 x 40)."""
    from study.data.transforms import random_scale_from_set
    for step in steps:
        if step == "scale":
            image, label = random_scale_from_set(image, label, (1.0, 1.25, 1.5), gen)
        elif step == "crop":
            image, label = random_crop(image, label, (32, 40), gen, upscale_small=True)
        elif step == "flip":
            image, label = random_hflip(image, label, gen)
        else:
            image = color_jitter(image, 0.5, gen, bgr=True)
    return image, label


@pytest.mark.parametrize("order,steps", [("scale_crop_flip_jitter", ["scale", "crop", "flip", "jitter"]),
                                         ("jitter_flip_scale_crop", ["jitter", "flip", "scale", "crop"])])
def test_augment_order(order, steps):
    image, label = blocky()
    tf = ident(scale_set=(1.0, 1.25, 1.5), crop=(32, 40), hflip=True, color_jitter=0.5, crop_small="upscale",
               augment_order=order)
    differs = 0
    for seed in range(6):
        x, y = tf(image, label, torch.Generator().manual_seed(seed))
        ref_image, ref_label = _manual(image, label, torch.Generator().manual_seed(seed), steps)
        np.testing.assert_array_equal(y.numpy(), ref_label)
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), ref_image.astype(np.float32))
        other = [s for s in (["scale", "crop", "flip", "jitter"], ["jitter", "flip", "scale", "crop"]) if s != steps][0]
        alt_image, _ = _manual(image, label, torch.Generator().manual_seed(seed), other)
        differs += not np.array_equal(alt_image.astype(np.float32), x.permute(1, 2, 0).numpy())
    assert differs > 0  # the two orders are distinguishable


@pytest.mark.parametrize("kw,msg", [
    ({"scale": (0.5, 2.0), "scale_set": (1.0, 2.0)}, "scale_set: .* together with scale"),
    ({"scale_set": ()}, r"scale_set: \(\) is not allowed"),
    ({"scale_set": (1.0, -2.0)}, "scale_set: .* finite numbers > 0"),
    ({"crop_small": "stretch"}, r"crop_small: 'stretch' is not allowed \(allowed: \['pad', 'upscale'\]\)"),
    ({"augment_order": "random"}, "augment_order: 'random' is not allowed"),
])
def test_invalid_switches(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ident(**kw)


@pytest.mark.parametrize("bgr", [False, True])
def test_uint8_steps_jitter_equals_pil_image_enhance(bgr):
    """The released pipeline calls PIL's ImageEnhance Brightness -> Contrast -> Color; PIL is the oracle."""
    from PIL import Image, ImageEnhance

    from study.data.transforms import _uniform

    rng = np.random.default_rng(3)
    saturating = 0
    for seed in range(40):
        rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
        rgb[:4] = rng.integers(200, 256, (4, 31, 3), dtype=np.uint8)  # a bright band that saturates
        fed = rgb[..., ::-1].copy() if bgr else rgb
        out = color_jitter(fed, 0.5, torch.Generator().manual_seed(seed), bgr=bgr, arithmetic="uint8_steps")
        draw = torch.Generator().manual_seed(seed)
        b, c, t = (_uniform(draw, 0.5, 1.5) for _ in range(3))
        im = ImageEnhance.Brightness(Image.fromarray(rgb)).enhance(b)
        im = ImageEnhance.Contrast(im).enhance(c)
        expected = np.asarray(ImageEnhance.Color(im).enhance(t))
        np.testing.assert_array_equal(out[..., ::-1] if bgr else out, expected)
        floated = color_jitter(fed, 0.5, torch.Generator().manual_seed(seed), bgr=bgr)
        saturating += not np.array_equal(floated, out)
    assert saturating > 20  # the float arithmetic (the default) differs: the switch matters


def test_jitter_arithmetic_is_validated():
    with pytest.raises(ValueError, match=r"jitter_arithmetic: 'pil' is not allowed \(allowed: \['float', 'uint8_steps'\]\)"):
        ident(jitter_arithmetic="pil")

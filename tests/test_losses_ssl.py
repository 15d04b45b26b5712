"""Structural similarity loss: a reference written from the equations of Zhao et al. 2019 (as transcribed in
Jadon 2020: C4 in numerators and denominators, e_max and M = sum_n sum_c f_nc over all class channels), built
on scipy.ndimage.gaussian_filter (local statistics) and numpy for values, with the hard-position weights as
constants for gradients; a hand-computed 1x2 case; perfect predictions; ignored pixels; parameter checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from study.losses import build_loss

IGNORE = 255


def make_batch(shape, seed, absent=(1,), ignore_frac=0.2, scale=2.0):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    keep = torch.tensor([k for k in range(c) if k not in absent])
    coarse = torch.randn(n, len(keep), 3, 3, generator=g)
    t = keep[torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").argmax(1)]
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return x, t


def ref_ssl(x, t, c, gamma=0.5, beta=0.1, sigma_window=1.5, eps=0.01):
    """Loss via scipy: local mean/std by Gaussian filtering of v*m and m (m = valid mask, zero outside);
    e, f for every (position, class); L_ssl = sum_{n,c} f e (-y log p) / sum_{n,c} f."""
    sigma = sigma_window
    xn = x.detach().numpy()
    tn = t.numpy()
    valid = tn != IGNORE
    p = np.exp(xn - xn.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True) * valid[:, None]
    n, _, h, w = xn.shape
    e = np.zeros((n, c, h, w))

    def blur(v):
        return gaussian_filter(v, sigma, mode="constant", cval=0.0, truncate=5 / sigma)

    for a in range(n):
        m = valid[a].astype(float)
        den = blur(m)
        for k in range(c):
            norm = []
            for v in ((tn[a] == k).astype(float), p[a, k]):
                mu = blur(v * m) / np.maximum(den, 1e-300)
                var = blur(v * v * m) / np.maximum(den, 1e-300) - mu ** 2
                norm.append((v - mu + eps) / (np.sqrt(np.maximum(var, 0)) + eps))
            e[a, k] = np.abs(norm[0] - norm[1]) * m
    f = (e > beta * e.max()).astype(float)
    logp = torch.log_softmax(x, 1)
    num = x.sum() * 0
    for a in range(n):
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    y = float(tn[a, i, j] == k)  # 0 at ignored pixels
                    if f[a, k, i, j] and y:
                        num = num + f[a, k, i, j] * e[a, k, i, j] * (-y * logp[a, k, i, j])
    nll = torch.nn.functional.cross_entropy(x, torch.where(t == IGNORE, 0, t), reduction="none")
    ce = (nll * torch.from_numpy(valid)).sum() / valid.sum()
    l_ssl = num / max(f.sum(), 1.0)
    return gamma * ce + (1 - gamma) * l_ssl, f.sum()


@pytest.mark.parametrize("shape,seed,params", [((2, 4, 13, 17), 0, {}), ((1, 3, 9, 8), 1, {"gamma": 0.2, "beta": 0.3}),
                                               ((3, 5, 7, 12), 2, {"sigma_window": 1.0, "eps": 0.05})])
def test_matches_scipy_reference(shape, seed, params):
    x, t = make_batch(shape, seed)
    ours = build_loss("ssl", shape[1], **params)(x, t)
    ref, n_hard = ref_ssl(x, t, shape[1], **params)
    assert 0 < n_hard < (t != IGNORE).sum() * shape[1]
    # sigma = sqrt(E[v^2] - mu^2) carries ~1e-8 of rounding where a window is flat, and C4 = 0.01 in the
    # numerators no longer cancels it: the two implementations agree to ~1e-8 relative
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    g1, g2 = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (ours, ref))
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    assert (g1.permute(0, 2, 3, 1)[t == IGNORE] == 0).all()


def test_hand_computed_1x2():
    # two pixels, labels [0, 1]: normalised-convolution weights a (self), b (other) with b/a = exp(-1/(2*1.5^2));
    # mu = a v_i + b v_j, sigma = sqrt(ab) |v_i - v_j|, so (v_i - mu + C4)/(sigma + C4)
    # = (b (v_i - v_j) + C4) / (sqrt(ab) |v_i - v_j| + C4). With C = 2, d = p0(pixel 0) - p0(pixel 1):
    # e = E+ at (pixel 0, class 0) and (pixel 1, class 1) (the targets), E- at the other two entries.
    x = torch.tensor([[[[-0.4, 0.7]], [[0.9, -0.1]]]], dtype=torch.float64)  # both pixels predicted wrong
    t = torch.tensor([[[0, 1]]])
    r = math.exp(-1 / (2 * 1.5 ** 2))
    a, b = 1 / (1 + r), r / (1 + r)
    s = math.sqrt(a * b)
    p = torch.softmax(x[0, :, 0], 0)
    d = float(p[0, 0] - p[0, 1])
    c4 = 0.01

    def norm(diff):
        return (b * diff + c4) / (s * abs(diff) + c4)

    e_plus, e_minus = abs(norm(1.0) - norm(d)), abs(norm(-1.0) - norm(-d))
    e_max = max(e_plus, e_minus)
    hard = {"+": e_plus > 0.1 * e_max, "-": e_minus > 0.1 * e_max}
    m = 2 * hard["+"] + 2 * hard["-"]
    ce0, ce1 = (float(-torch.log_softmax(x[0, :, 0, j], 0)[j]) for j in (0, 1))
    l_ssl = hard["+"] * e_plus * (ce0 + ce1) / m
    loss = build_loss("ssl", 2)(x, t)
    assert m == 4  # every entry is hard here: M counts both class channels
    assert float(loss) == pytest.approx(0.5 * (ce0 + ce1) / 2 + 0.5 * l_ssl, rel=1e-12)


def test_perfect_prediction():
    _, t = make_batch((2, 4, 12, 12), 3)
    x = (torch.nn.functional.one_hot(torch.where(t == IGNORE, 0, t), 4).permute(0, 3, 1, 2) * 25.0).double()
    loss = float(build_loss("ssl", 4)(x, t))
    ce = float(torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE))
    # e ~ 0 (p is one-hot up to ~1e-11) and CE ~ 0: the L_ssl term vanishes, the loss is gamma * CE
    assert ce < 1e-9 and loss == pytest.approx(0.5 * ce, rel=1e-3)


def test_gradients_finite_extreme_logits_and_zero_hard_positions():
    x, t = make_batch((2, 5, 10, 10), 4, scale=80.0)
    x = x.detach().float().requires_grad_()
    loss = build_loss("ssl", 5)(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # a single valid pixel: e = 0 everywhere, no hard position, L = gamma * CE
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    t = torch.full((1, 4, 4), IGNORE)
    t[0, 1, 2] = 2
    expected = 0.5 * torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE)
    torch.testing.assert_close(build_loss("ssl", 3)(x, t), expected)


@pytest.mark.parametrize("params,key", [({"gamma": 1.5}, "gamma"), ({"beta": -0.1}, "beta"),
                                        ({"sigma_window": 0.0}, "sigma_window"), ({"eps": 0.0}, "eps")])
def test_invalid_params(params, key):
    with pytest.raises(ValueError, match=key):
        build_loss("ssl", 4, **params)

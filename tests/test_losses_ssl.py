"""Structural similarity loss: a reference built on scipy.ndimage.gaussian_filter (local statistics) and numpy
for values, with the hard-position weights as constants for gradients; a hand-computed 1x2 case; perfect
predictions; ignored pixels; parameter checks."""

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
    sigma = sigma_window
    """Loss via scipy: local mean/std by Gaussian filtering of v*m and m (m = valid mask, zero outside)."""
    xn = x.detach().numpy()
    tn = t.numpy()
    valid = tn != IGNORE
    p = np.exp(xn - xn.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True) * valid[:, None]
    n, _, h, w = xn.shape
    fe = np.zeros((n, h, w))

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
                norm.append((v - mu) / (np.sqrt(np.maximum(var, 0)) + eps))
            e = np.abs(norm[0] - norm[1])
            fe[a][tn[a] == k] = e[tn[a] == k]
    e_max = fe.max()
    f = (fe > beta * e_max).astype(float)
    fe = fe * f
    nll = torch.nn.functional.cross_entropy(x, torch.where(t == IGNORE, 0, t), reduction="none")
    nll = nll * torch.from_numpy(valid)
    ce = nll.sum() / valid.sum()
    l_ssl = (torch.from_numpy(fe) * nll).sum() / max(f.sum(), 1.0)
    return gamma * ce + (1 - gamma) * l_ssl, f.sum()


@pytest.mark.parametrize("shape,seed,params", [((2, 4, 13, 17), 0, {}), ((1, 3, 9, 8), 1, {"gamma": 0.2, "beta": 0.3}),
                                               ((3, 5, 7, 12), 2, {"sigma_window": 1.0, "eps": 0.05})])
def test_matches_scipy_reference(shape, seed, params):
    x, t = make_batch(shape, seed)
    ours = build_loss("ssl", shape[1], **params)(x, t)
    ref, n_hard = ref_ssl(x, t, shape[1], **params)
    assert 0 < n_hard < (t != IGNORE).sum()
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    g1, g2 = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (ours, ref))
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert (g1.permute(0, 2, 3, 1)[t == IGNORE] == 0).all()


def test_hand_computed_1x2():
    # two pixels, labels [0, 1]: normalised-convolution weights a (self), b (other) with b/a = exp(-1/(2*1.5^2));
    # mu = a v_i + b v_j, var = ab (v_i - v_j)^2, (v_i - mu)/(sigma + eps) = b (v_i - v_j)/(sqrt(ab)|v_i - v_j| + eps).
    # For C = 2 both pixels get the same e, so both are hard and L = gamma CE + (1 - gamma) e CE.
    x = torch.tensor([[[[0.7, -0.4]], [[-0.1, 0.9]]]], dtype=torch.float64)
    t = torch.tensor([[[0, 1]]])
    r = math.exp(-1 / (2 * 1.5 ** 2))
    a, b = 1 / (1 + r), r / (1 + r)
    p = torch.softmax(x[0, :, 0], 0)
    d = float(p[0, 0] - p[0, 1])
    eps = 0.01
    e = abs(b / (math.sqrt(a * b) + eps) - b * d / (math.sqrt(a * b) * abs(d) + eps))
    ce = float(torch.nn.functional.cross_entropy(x, t))
    loss = build_loss("ssl", 2)(x, t)
    assert float(loss) == pytest.approx(0.5 * ce + 0.5 * e * ce, rel=1e-12)


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

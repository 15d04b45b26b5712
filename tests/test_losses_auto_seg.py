"""Auto Seg-Loss: the Bezier evaluation against a dense sampling of the curve (numpy interpolation) and its
derivative against finite differences of that sampling; the surrogates against plain-loop references over
classes and pixels (identity h: soft recall / soft IoU; searched h: a separately written quadratic solve),
values and gradients, with ignored pixels and absent classes; perfect predictions; parameter checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.losses import build_loss
from tests.loss_helpers import random_batch


def make_batch(shape, seed, absent=(1,), ignore_frac=0.25):
    return random_batch(shape, seed, absent, ignore_frac)
from study.losses.auto_seg import PRESETS, bezier_h

IGNORE = 255
CURVES = [PRESETS["macc_searched"]["h"], PRESETS["miou_searched"]["and"], PRESETS["miou_searched"]["or"],
          (0.1, 0.5, 0.3, 0.55, 0.9, 0.6)]


def dense_curve(params, num=400001):
    """Sample both quadratic Bezier segments finely in t: (x(t), y(t)) arrays, x increasing."""
    xc1, yc1, xe1, ye1, xc2, yc2 = params
    t = np.linspace(0.0, 1.0, num)
    xs, ys = [], []
    for (x0, y0), (x1, y1), (x2, y2) in [((0, 0), (xc1, yc1), (xe1, ye1)), ((xe1, ye1), (xc2, yc2), (1, 1))]:
        xs.append((1 - t) ** 2 * x0 + 2 * t * (1 - t) * x1 + t ** 2 * x2)
        ys.append((1 - t) ** 2 * y0 + 2 * t * (1 - t) * y1 + t ** 2 * y2)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("params", CURVES)
def test_bezier_matches_dense_curve(params):
    xs, ys = dense_curve(params)
    assert np.all(np.diff(xs) >= 0)
    q = np.concatenate([np.linspace(0, 1, 2001), np.random.default_rng(0).random(500), [params[2]]])
    h = bezier_h(torch.from_numpy(q), params).numpy()
    np.testing.assert_allclose(h, np.interp(q, xs, ys), atol=2e-6)
    grid = bezier_h(torch.linspace(0, 1, 10001, dtype=torch.float64), params).numpy()
    assert np.all(np.diff(grid) >= 0)  # monotone
    ends = bezier_h(torch.tensor([0.0, 1.0], dtype=torch.float64), params).tolist()
    assert ends == pytest.approx([0.0, 1.0], abs=1e-15)


@pytest.mark.parametrize("params", CURVES)
def test_bezier_derivative(params):
    xs, ys = dense_curve(params)
    q = torch.tensor([0.05, 0.2, 0.37, 0.5, 0.66, 0.8, 0.97], dtype=torch.float64)
    q = q[(q - params[2]).abs() > 0.02].requires_grad_()  # away from the junction (slope may jump there)
    grad = torch.autograd.grad(bezier_h(q, params).sum(), q)[0].numpy()
    delta = 1e-4
    qn = q.detach().numpy()
    fd = (np.interp(qn + delta, xs, ys) - np.interp(qn - delta, xs, ys)) / (2 * delta)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)
    assert torch.autograd.gradcheck(lambda v: bezier_h(v, params), (q,))


def ref_h(v, params):
    """h by the textbook quadratic formula (-b + sqrt(b^2 - 4 a c)) / 2a on the right segment (torch scalars)."""
    xc1, yc1, xe1, ye1, xc2, yc2 = params
    seg = ((0, 0), (xc1, yc1), (xe1, ye1)) if float(v.detach()) <= xe1 else ((xe1, ye1), (xc2, yc2), (1, 1))
    (x0, y0), (x1, y1), (x2, y2) = seg
    a, b, c = x0 - 2 * x1 + x2, 2 * (x1 - x0), x0 - v
    t = -c / b if abs(a) < 1e-12 else (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
    return (1 - t) ** 2 * y0 + 2 * t * (1 - t) * y1 + t ** 2 * y2


def ref_loss(x, t, c, metric, curves, reduction="all_classes"):
    """1 - mean of the per-class scores: over all C classes (official: an absent class scores 0, its
    intersection being empty) or over the classes present in the batch."""
    n, _, h, w = x.shape
    p = torch.softmax(x, 1)
    scores = []
    for k in range(c):
        pix = [(a, i, j) for a in range(n) for i in range(h) for j in range(w) if int(t[a, i, j]) == k]
        if not pix:
            if reduction == "all_classes":
                scores.append(0.0)
            continue
        if metric == "macc":
            scores.append(sum(curves["h"](p[a, k, i, j]) for a, i, j in pix) / len(pix))
        else:
            inter = sum(curves["and"](p[a, k, i, j]) for a, i, j in pix)
            union = 0
            for a in range(n):
                for i in range(h):
                    for j in range(w):
                        if int(t[a, i, j]) != IGNORE:
                            hv, yv = curves["or"](p[a, k, i, j]), float(int(t[a, i, j]) == k)
                            union = union + hv + yv - hv * yv
            scores.append(inter / union)
    return 1 - sum(scores) / len(scores)




@pytest.mark.parametrize("metric,params", [("macc", "identity"), ("miou", "identity"), ("macc", "macc_searched"),
                                           ("miou", "miou_searched"), ("macc", list(CURVES[3])),
                                           ("miou", {"and": CURVES[3], "or": CURVES[0]})])
@pytest.mark.parametrize("reduction", ["all_classes", "present_classes"])
def test_surrogate_matches_loop_reference(metric, params, reduction):
    shape = (2, 4, 4, 5)
    x, t = make_batch(shape, seed=len(str(params)) + (metric == "miou"))
    if params == "identity":
        curves = {k: (lambda v: v) for k in ("h", "and", "or")}
    else:
        raw = PRESETS[params] if isinstance(params, str) else params if isinstance(params, dict) else {"h": params}
        curves = {k: (lambda v, cp=tuple(cp): ref_h(v, cp)) for k, cp in raw.items()}
    ours = build_loss("auto_seg", shape[1], metric=metric, params=params, reduction=reduction)(x, t)
    ref = ref_loss(x, t, shape[1], metric, curves, reduction)
    assert (t == 1).sum() == 0  # class 1 absent: the reductions differ
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    g1, g2 = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (ours, ref))
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    assert (g1.permute(0, 2, 3, 1)[t == IGNORE] == 0).all()


@pytest.mark.parametrize("metric", ["miou", "macc"])
def test_perfect_prediction_and_ignored_logits(metric):
    x, t = make_batch((2, 5, 8, 8), seed=3)  # class 1 absent
    onehot = torch.nn.functional.one_hot(torch.where(t == IGNORE, 0, t), 5).permute(0, 3, 1, 2).double()
    # official reduction: the absent class scores 0 out of C = 5
    assert float(build_loss("auto_seg", 5, metric=metric)(onehot * 60.0, t)) == pytest.approx(1 / 5, abs=1e-9)
    loss_fn = build_loss("auto_seg", 5, metric=metric, reduction="present_classes")
    assert float(loss_fn(onehot * 60.0, t)) == pytest.approx(0.0, abs=1e-9)
    assert float(loss_fn(x.detach(), t)) > 0.2
    # logits at ignored pixels do not matter
    x2 = x.detach().clone()
    x2.permute(0, 2, 3, 1)[t == IGNORE] = 1e3
    torch.testing.assert_close(loss_fn(x2, t), loss_fn(x.detach(), t))


def test_gradients_finite_extreme_logits():
    x, t = make_batch((2, 5, 8, 8), seed=4)
    x = (x.detach().float() * 50).requires_grad_()
    for metric in ("miou", "macc"):
        loss = build_loss("auto_seg", 5, metric=metric)(x, t)
        g = torch.autograd.grad(loss, x)[0]
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_ce_weight_adds_cross_entropy():
    x, t = make_batch((2, 4, 5, 5), seed=6)
    base = build_loss("auto_seg", 4, metric="macc")(x, t)
    with_ce = build_loss("auto_seg", 4, metric="macc", ce_weight=0.5)(x, t)
    torch.testing.assert_close(with_ce, base + 0.5 * torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE))


@pytest.mark.parametrize("params,key", [
    ({"metric": "dice"}, "metric"),
    ({"params": "fancy"}, "params"),
    ({"metric": "miou", "params": "macc_searched"}, "macc_searched"),
    ({"metric": "macc", "params": [0.1, 0.2, 0.3]}, "6 numbers"),
    ({"metric": "macc", "params": [0.5, 0.2, 0.3, 0.4, 0.9, 0.95]}, "x_ctrl1"),  # x not increasing
    ({"metric": "macc", "params": [0.1, 0.6, 0.3, 0.4, 0.9, 0.95]}, "monotone"),  # y decreasing
    ({"metric": "macc", "params": [0.1, 0.2, 0.3, 0.4, 0.9, 1.5]}, r"\[0, 1\]"),
    ({"metric": "miou", "params": {"and": CURVES[0]}}, "keys"),
    ({"ce_weight": -1.0}, "ce_weight"),
    ({"reduction": "mean"}, r"reduction: 'mean' is not allowed \(allowed: \['all_classes', 'present_classes'\]\)"),
])
def test_invalid_params(params, key):
    with pytest.raises(ValueError, match=key):
        build_loss("auto_seg", 4, **params)


def test_published_parameters_are_the_design_values():
    assert PRESETS["macc_searched"]["h"] == (0.021454, 0.739057, 0.411634, 0.798656, 0.919862, 0.950412)
    assert PRESETS["miou_searched"]["and"] == (0.000570, 0.643720, 0.338589, 0.705543, 0.625281, 0.779552)
    assert PRESETS["miou_searched"]["or"] == (0.690376, 0.013063, 0.834171, 0.962432, 0.942998, 0.980038)
    identity = PRESETS["identity"]["h"]
    assert math.isclose(float(bezier_h(torch.tensor(0.3, dtype=torch.float64), identity)), 0.3)

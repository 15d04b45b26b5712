"""Active Boundary Loss: direction targets on synthetic edges, a hand-computed 1x4 case, a plain-loop reference
(python loops; brute-force Euclidean distances instead of scipy) for values and gradients on random inputs
with ignored pixels and an absent class, perfect predictions, ignored pixels, parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from study.losses import build_loss
from study.losses._functional import extended_target
from study.losses.abl import boundary_distance, direction_targets, gt_boundary

IGNORE = 255
# released code's neighbour order, (dy, dx): down, up, left, right, up-right, down-right, up-left, down-left
DIRS = [(1, 0), (-1, 0), (0, -1), (0, 1), (-1, 1), (1, 1), (-1, -1), (1, -1)]
DOWN, UP, LEFT, RIGHT = 0, 1, 2, 3


def dist_and_dirs(t, c):
    d = boundary_distance(gt_boundary(extended_target(t, c, IGNORE), c))
    return d, direction_targets(d)


def test_vertical_edge_directions():
    t = torch.zeros(1, 12, 16, dtype=torch.long)
    t[:, :, 8:] = 1
    d, k = dist_and_dirs(t, 2)
    assert gt_boundary(t, 2)[0].nonzero()[:, 1].unique().tolist() == [7]  # one-sided: last column of class 0
    cols = torch.arange(16).expand(12, 16)
    torch.testing.assert_close(d[0], (cols - 7).abs().sub(1).clamp_min(0).float())
    assert (k[0][:, :6] == RIGHT).all()  # left of the edge (d' > 0): move right
    assert (k[0][:, 9:] == LEFT).all()  # right of the edge: move left


def test_horizontal_edge_and_ignore_region_directions():
    t = torch.zeros(1, 16, 10, dtype=torch.long)
    t[:, 8:] = 2
    d, k = dist_and_dirs(t, 3)
    assert (k[0][:6] == DOWN).all() and (k[0][9:] == UP).all()
    # an ignored block counts as boundary: pixels left of it point right, towards it
    t = torch.zeros(1, 9, 20, dtype=torch.long)
    t[:, :, 15:] = IGNORE
    d, k = dist_and_dirs(t, 3)
    assert (d[0][:, 15:] == 0).all()
    assert (k[0][:, :13] == RIGHT).all()


def test_image_without_boundary_contributes_nothing():
    t = torch.ones(1, 6, 7, dtype=torch.long)
    d, _ = dist_and_dirs(t, 3)
    assert (d == 0).all()
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    loss = build_loss("abl", 3, max_boundary_fraction=1.0)(x, t)
    ce = torch.nn.functional.cross_entropy(x, t)
    torch.testing.assert_close(loss, ce)


def test_hand_computed_1x4():
    # labels [0, 0, 0, 1]: GT boundary at column 2, d = [2, 1, 0, 1], d' = [1, 0, 0, 0]; only pixel 0 has weight
    # 1/20 and target "right". Its 8 neighbours (replicated borders): itself for down, up, left, up-left,
    # down-left (KL 0) and pixel 1 for right, up-right, down-right (KL(p1 || p0) = k).
    x = torch.tensor([[[[1.0, 0.5, -0.2, -1.0]], [[0.0, 0.3, 0.4, 2.0]]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0, 0, 0, 1]]])
    loss = build_loss("abl", 2, max_boundary_fraction=1.0)(x, t)
    p = torch.softmax(x.detach()[0, :, 0], 0)  # [2, 4]
    k = float((p[:, 1] * (p[:, 1].log() - p[:, 0].log())).sum())
    log_z = math.log(5 + 3 * math.exp(k))
    s = 0.2
    lsce = -(1 - s) * (k - log_z) - s / 8 * (3 * k - 8 * log_z)
    ce = float(torch.nn.functional.cross_entropy(x.detach(), t))
    # all 4 pixels are on the dilated predicted boundary
    assert float(loss.detach()) == pytest.approx(ce + (1 / 20) * lsce / 4, rel=1e-12)


# ---------------------------------------------------------------- plain-loop reference


def ref_distance(d, integer):
    """d' from the Euclidean distance d to the nearest GT boundary pixel. integer: the released arithmetic,
    the signed value 1 - d stored in an int32 array (C truncation towards zero), then negated and clipped."""
    if integer:
        return max(-int(1.0 - d), 0) if d > 0 else 0
    return max(d - 1, 0.0)


def ref_abl(x, t, c, frac, weight=1.0, s=0.2, max_d=20.0, integer=False):
    n, _, h, w = x.shape
    logp = torch.log_softmax(x, 1)
    lq = logp.detach()
    valid = [[[int(t[a, i, j]) != IGNORE for j in range(w)] for i in range(h)] for a in range(n)]

    def kl(a, i1, j1, i2, j2):  # KL(p_(i1,j1) || p_(i2,j2)), detached
        return float((lq[a, :, i1, j1].exp() * (lq[a, :, i1, j1] - lq[a, :, i2, j2])).sum())

    b = {}
    for a in range(n):
        for i in range(h):
            for j in range(w):
                v = 0.0
                if i + 1 < h:
                    v += kl(a, i, j, i + 1, j)
                if j + 1 < w:
                    v += kl(a, i, j, i, j + 1)
                b[a, i, j] = v if valid[a][i][j] else 0.0
    values = sorted(b.values(), reverse=True)
    m = int(frac * len(values))
    thr = max(1e-5, values[m]) if m < len(values) else 1e-5
    core = {key for key, v in b.items() if v > thr}
    pred = [(a, i, j) for a in range(n) for i in range(h) for j in range(w) if valid[a][i][j]
            and any((a, i + di, j + dj) in core for di in (-1, 0, 1) for dj in (-1, 0, 1))]

    def lab(a, i, j):
        return int(t[a, i, j])

    dist = {}
    for a in range(n):
        bd = [(i, j) for i in range(h) for j in range(w) if lab(a, i, j) == IGNORE
              or (i + 1 < h and lab(a, i + 1, j) != lab(a, i, j)) or (j + 1 < w and lab(a, i, j + 1) != lab(a, i, j))]
        for i in range(h):
            for j in range(w):
                dist[a, i, j] = ref_distance(min(math.hypot(i - u, j - v) for u, v in bd), integer) if bd else 0.0

    num = x.sum() * 0
    for a, i, j in pred:
        dn = [dist[a, i + dy, j + dx] if 0 <= i + dy < h and 0 <= j + dx < w else math.inf for dy, dx in DIRS]
        kstar = dn.index(min(dn))
        z = []
        for dy, dx in DIRS:
            ii, jj = min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)
            q = lq[a, :, ii, jj].exp()
            z.append((q * (lq[a, :, ii, jj] - logp[a, :, i, j])).sum())
        logz = torch.log_softmax(torch.stack(z), 0)
        lsce = -(1 - s) * logz[kstar] - s / 8 * logz.sum()
        num = num + min(dist[a, i, j], max_d) / max_d * lsce
    abl = num / len(pred) if pred else num
    ce = torch.nn.functional.cross_entropy(x, t, ignore_index=IGNORE)
    return ce + weight * abl, len(pred)


def test_released_integer_distance_map_matches_brute_force():
    t = blob_target(2, 9, 13, 4, seed=7)
    boundary = gt_boundary(extended_target(t, 4, IGNORE), 4)
    ours = boundary_distance(boundary, torch.float64, integer=True)
    floats = boundary_distance(boundary, torch.float64)
    n, h, w = t.shape
    for a in range(n):
        bd = [(u, v) for u in range(h) for v in range(w) if boundary[a, u, v]]
        for i in range(h):
            for j in range(w):
                d = min(math.hypot(i - u, j - v) for u, v in bd)
                assert float(ours[a, i, j]) == ref_distance(d, integer=True)
    assert (ours != floats).any()  # the truncation matters on this image


def blob_target(n, h, w, c, seed, absent=(1,), ignore_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.tensor([k for k in range(c) if k not in absent])
    coarse = torch.randn(n, len(keep), 3, 3, generator=g)
    t = keep[torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").argmax(1)]
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return t


@pytest.mark.parametrize("shape,frac,weight,seed", [((2, 4, 9, 11), 1.0, 1.0, 0), ((2, 4, 9, 11), 0.08, 0.5, 1),
                                                    ((1, 3, 12, 10), 0.03, 2.0, 2)])
@pytest.mark.parametrize("official_compat", [False, True])
def test_matches_plain_loop_reference(shape, frac, weight, seed, official_compat):
    n, c, h, w = shape
    t = blob_target(n, h, w, c, seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ours = build_loss("abl", c, max_boundary_fraction=frac, weight=weight, official_compat=official_compat)(x, t)
    ref, n_pred = ref_abl(x, t, c, frac, weight, integer=official_compat)
    assert n_pred > 0
    if official_compat and frac == 1.0:  # the integer map changes the loss here
        other, _ = ref_abl(x, t, c, frac, weight, integer=False)
        assert abs(float((other - ref).detach())) > 1e-6
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g1, g2 = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (ours, ref))
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert (g1.permute(0, 2, 3, 1)[t == IGNORE] == 0).all()  # ignored pixels: no gradient at all


def test_threshold_caps_the_boundary_fraction():
    from study.losses.abl import predicted_boundary
    x = torch.randn(2, 4, 20, 30)
    logp = x.log_softmax(1)
    valid = torch.ones(2, 20, 30)
    core = predicted_boundary(logp, valid, 0.01)
    # at most floor(0.01 * 1200) = 12 core pixels, each dilated to at most 9 pixels
    assert 0 < int(core.sum()) <= 12 * 9
    assert not predicted_boundary(logp, valid, 0.0).any()


def test_perfect_prediction():
    # straight edges: every dilated predicted-boundary pixel has d' = 0, so the ABL term is exactly 0
    t = torch.zeros(2, 16, 20, dtype=torch.long)
    t[0, :, 10:] = 1
    t[1, 5:, :] = 2
    t[1, 0, 0] = IGNORE
    x = (torch.nn.functional.one_hot(t.clamp_max(2), 3).permute(0, 3, 1, 2) * 30.0).double().requires_grad_()
    loss_fn = build_loss("abl", 3, max_boundary_fraction=1.0)
    t_ext = extended_target(t, 3, IGNORE)
    term = loss_fn.boundary_term(x, t_ext, t_ext < 3)
    assert float(term.detach()) == 0.0
    # curved boundaries: the predicted boundary stays within one pixel (Chebyshev) of the GT boundary, so
    # d' <= sqrt(2) - 1 and every weight is <= 0.0207: not 0, but small compared with a random prediction
    from study.losses.abl import predicted_boundary
    t = blob_target(2, 24, 24, 3, seed=5, absent=(), ignore_frac=0.0)
    x = torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).double() * 30.0
    t_ext = extended_target(t, 3, IGNORE)
    pred = predicted_boundary(x.log_softmax(1), torch.ones(2, 24, 24, dtype=x.dtype), 1.0)
    d = boundary_distance(gt_boundary(t_ext, 3), torch.float64)
    assert pred.any() and float(d[pred].max()) <= math.sqrt(2) - 1 + 1e-12
    perfect = float(loss_fn.boundary_term(x, t_ext, t_ext < 3))
    rand = float(loss_fn.boundary_term(torch.randn_like(x) * 3, t_ext, t_ext < 3))
    assert 0.0 <= perfect < 0.1 * rand


def test_gradients_finite_with_extreme_logits():
    t = blob_target(2, 16, 16, 5, seed=3)
    x = (torch.randn(2, 5, 16, 16) * 60).requires_grad_()
    loss = build_loss("abl", 5, max_boundary_fraction=0.05)(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("params,key", [({"weight": -1.0}, "weight"), ({"max_boundary_fraction": 1.5}, "max_boundary"),
                                        ({"label_smoothing": 1.0}, "label_smoothing"),
                                        ({"max_distance": 0}, "max_distance")])
def test_invalid_params(params, key):
    with pytest.raises(ValueError, match=key):
        build_loss("abl", 4, **params)

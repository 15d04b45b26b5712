"""Weakly supervised losses against plain-loop O(N^2) references (float64, values and gradients):
the DenseCRF loss of Tang et al. and the Dynamic Feature Regularized loss (kernel term and feature
consistency loss), written from the formulas in their docstrings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.losses.dense_crf import DenseCRFLoss
from study.losses.dfr import DynamicFeatureRegularizedLoss

IGNORE = 255


def block_mean(a: np.ndarray, block: int) -> np.ndarray:
    """[..., H, W] -> [..., H/block, W/block] mean over block x block cells (plain loops)."""
    *lead, H, W = a.shape
    out = np.zeros((*lead, H // block, W // block))
    for i in range(H // block):
        for j in range(W // block):
            out[..., i, j] = a[..., i * block:(i + 1) * block, j * block:(j + 1) * block].mean(axis=(-1, -2))
    return out


def ref_partial_ce(logits: torch.Tensor, target: np.ndarray) -> torch.Tensor:
    total, count = logits.new_zeros(()), 0
    N, C, H, W = logits.shape
    for n in range(N):
        for i in range(H):
            for j in range(W):
                if target[n, i, j] != IGNORE:
                    total = total - torch.log_softmax(logits[n, :, i, j], 0)[int(target[n, i, j])]
                    count += 1
    return total / max(count, 1)


def ref_block_probs(logits: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Softmax of image n averaged over block x block cells, [C, h, w] (differentiable, plain loops)."""
    s = torch.softmax(logits[n], 0)
    C, H, W = s.shape
    rows = []
    for i in range(H // block):
        cols = [s[:, i * block:(i + 1) * block, j * block:(j + 1) * block].mean((1, 2)) for j in range(W // block)]
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows, 1)


def ref_bilateral(rgb: np.ndarray, block: int, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
    """W_ij = exp(-|I_i-I_j|^2/(2 s_rgb^2) - |p_i-p_j|^2/(2 s_xy^2)) over cells, positions in input pixels."""
    img = block_mean(rgb, block)
    _, h, w = img.shape
    cells = [(i, j) for i in range(h) for j in range(w)]
    K = np.zeros((len(cells), len(cells)))
    for a, (i, j) in enumerate(cells):
        for b, (k, l) in enumerate(cells):
            d_rgb = sum((img[c, i, j] - img[c, k, l]) ** 2 for c in range(3))
            d_xy = (block * (i - k)) ** 2 + (block * (j - l)) ** 2
            K[a, b] = math.exp(-d_rgb / (2 * sigma_rgb ** 2) - d_xy / (2 * sigma_xy ** 2))
    return K


def ref_potts(probs: torch.Tensor, K: np.ndarray) -> torch.Tensor:
    """sum_k sum_i sum_j S_ik W_ij (1 - S_jk) by explicit broadcasting per class."""
    C = probs.shape[0]
    flat = probs.reshape(C, -1)
    Kt = torch.as_tensor(K)
    return sum((flat[k][:, None] * Kt * (1 - flat[k][None, :])).sum() for k in range(C))


def ref_dense_crf(logits, target, rgb, weight, sigma_rgb, sigma_xy, block=1, factor=1.0):
    reg = logits.new_zeros(())
    for n in range(logits.shape[0]):
        reg = reg + ref_potts(ref_block_probs(logits, n, block), ref_bilateral(rgb[n], block, sigma_rgb, sigma_xy))
    return ref_partial_ce(logits, target) + weight * factor * reg / logits.shape[0]


def make_batch(N=2, C=3, H=6, W=8, seed=0, labelled=0.3):
    g = np.random.default_rng(seed)
    logits = torch.tensor(g.normal(0, 1.5, (N, C, H, W)), dtype=torch.float64, requires_grad=True)
    target = g.integers(0, C, (N, H, W))
    target[g.random((N, H, W)) > labelled] = IGNORE
    rgb = np.zeros((N, 3, H, W))
    rgb[:, :, :, W // 2:] = 200.0  # two colour regions plus noise
    rgb += g.normal(0, 20, rgb.shape)
    return logits, target, rgb


def grads(fn, logits):
    logits.grad = None
    value = fn()
    value.backward()
    return value.detach(), logits.grad.clone()


@pytest.mark.parametrize("scale,block,sigma_rgb,sigma_xy", [(1.0, 1, 40.0, 3.0), (0.5, 2, 15.0, 100.0)])
def test_dense_crf_matches_plain_loop_reference(scale, block, sigma_rgb, sigma_xy):
    logits, target, rgb = make_batch()
    weight = 0.01
    loss = DenseCRFLoss(3, weight=weight, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy, scale=scale)
    img = torch.as_tensor(rgb)
    v_impl, g_impl = grads(lambda: loss(logits, torch.as_tensor(target), image=img), logits)
    v_ref, g_ref = grads(lambda: ref_dense_crf(logits, target, rgb, weight, sigma_rgb, sigma_xy, block), logits)
    assert v_impl.item() == pytest.approx(v_ref.item(), rel=1e-10)
    assert torch.allclose(g_impl, g_ref, rtol=1e-9, atol=1e-12)
    reg_only = ref_dense_crf(logits, target, rgb, 1.0, sigma_rgb, sigma_xy, block) - ref_partial_ce(logits, target)
    assert weight * reg_only.item() > 1e-3 * v_ref.item()  # the pairwise term is not negligible here


def test_dense_crf_beyond_exact_size_shrinks_the_grid_and_rescales():
    logits, target, rgb = make_batch(H=8, W=12)
    loss = DenseCRFLoss(3, weight=0.01, sigma_rgb=40.0, sigma_xy=4.0, scale=1.0, exact_max_pixels=24)
    v_impl, g_impl = grads(lambda: loss(logits, torch.as_tensor(target), image=torch.as_tensor(rgb)), logits)
    # 96 requested pixels > 24: the grid halves (4 x 6 cells of 2 x 2), pair sum x (96 / 24)^2
    v_ref, g_ref = grads(lambda: ref_dense_crf(logits, target, rgb, 0.01, 40.0, 4.0, block=2, factor=16.0), logits)
    assert v_impl.item() == pytest.approx(v_ref.item(), rel=1e-10)
    assert torch.allclose(g_impl, g_ref, rtol=1e-9, atol=1e-12)


def test_dense_crf_approximation_is_close_on_smooth_inputs():
    H, W = 16, 24
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    rgb = np.stack([10 * xx, 8 * yy, 100 + 0 * xx])[None]
    logits = torch.tensor(np.stack([xx / 6, yy / 6, 2 - xx / 12])[None], dtype=torch.float64)
    target = torch.full((1, H, W), IGNORE)
    exact = DenseCRFLoss(3, weight=1.0, sigma_rgb=30.0, sigma_xy=6.0, scale=1.0, exact_max_pixels=H * W)
    approx = DenseCRFLoss(3, weight=1.0, sigma_rgb=30.0, sigma_xy=6.0, scale=1.0, exact_max_pixels=H * W // 4)
    a = exact(logits, target, image=torch.as_tensor(rgb)).item()
    b = approx(logits, target, image=torch.as_tensor(rgb)).item()
    assert a > 1.0 and abs(b - a) / a < 0.1


def test_dense_crf_float32_matches_float64_and_all_ignored_is_finite():
    logits, target, rgb = make_batch(H=10, W=14)
    loss = DenseCRFLoss(3, weight=1e-3, sigma_rgb=15.0, sigma_xy=100.0)
    v64 = loss(logits, torch.as_tensor(target), image=torch.as_tensor(rgb))
    v32 = loss(logits.detach().float(), torch.as_tensor(target), image=torch.as_tensor(rgb).float())
    assert v32.dtype == torch.float32 and v32.item() == pytest.approx(v64.item(), rel=1e-5)
    empty = torch.full_like(torch.as_tensor(target), IGNORE)
    out = loss(logits, empty, image=torch.as_tensor(rgb))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,name", [({"weight": -1.0}, "weight"), ({"sigma_rgb": 0.0}, "sigma_rgb"),
                                      ({"sigma_xy": float("inf")}, "sigma_xy"), ({"scale": 1.5}, "scale"),
                                      ({"exact_max_pixels": 0}, "exact_max_pixels")])
def test_dense_crf_rejects_bad_parameters(kw, name):
    with pytest.raises(ValueError, match=name):
        DenseCRFLoss(3, **kw)


def test_dense_crf_needs_the_image():
    logits, target, _ = make_batch()
    assert DenseCRFLoss.needs == frozenset({"image"})
    with pytest.raises(ValueError, match="image"):
        DenseCRFLoss(3)(logits, torch.as_tensor(target))


# ------------------------------------------------------------------------------------------- DFR
def ref_embeddings(head, features: torch.Tensor, n: int, block: int) -> list[torch.Tensor]:
    """Head applied pixel by pixel (plain loop), unit-normalised, then averaged over cells -> list of [E]."""
    w1, b1 = head.net[0].weight[:, :, 0, 0], head.net[0].bias
    w2, b2 = head.net[2].weight[:, :, 0, 0], head.net[2].bias
    _, D, H, W = features.shape
    emb = {}
    for i in range(H):
        for j in range(W):
            z = w2 @ torch.relu(w1 @ features[n, :, i, j] + b1) + b2
            emb[i, j] = z / torch.sqrt((z * z).sum())
    cells = []
    for i in range(H // block):
        for j in range(W // block):
            pts = [emb[i * block + a, j * block + b] for a in range(block) for b in range(block)]
            cells.append(sum(pts) / len(pts))
    return cells


def ref_dfr_kernel(rgb, cells, block, H, W, s_rgb, s_xy, s_deep, deep_weight) -> np.ndarray:
    shallow = ref_bilateral(rgb, block, s_rgb, s_xy)
    w = W // block
    K = shallow.copy()
    for a in range(len(cells)):
        for b in range(len(cells)):
            d_xy = (block * (a // w - b // w)) ** 2 + (block * (a % w - b % w)) ** 2
            d_e = float(((cells[a] - cells[b]) ** 2).sum())
            K[a, b] += deep_weight * math.exp(-d_xy / (2 * s_xy ** 2) - d_e / (2 * s_deep ** 2))
    return K


def ref_consistency(cells, target_n: np.ndarray, s_deep: float) -> tuple[torch.Tensor, int]:
    """Mean BCE over ordered pairs of distinct labelled pixels (scale 1): target 1 same class, else 0."""
    H, W = target_n.shape
    labelled = [(i * W + j, int(target_n[i, j])) for i in range(H) for j in range(W) if target_n[i, j] != IGNORE]
    total, count = 0.0, 0
    for a, ca in labelled:
        for b, cb in labelled:
            if a == b:
                continue
            A = torch.exp(-((cells[a] - cells[b]) ** 2).sum() / (2 * s_deep ** 2)).clamp(1e-6, 1 - 1e-6)
            total = total - (torch.log(A) if ca == cb else torch.log(1 - A))
            count += 1
    return total / max(count, 1), count


def make_dfr(seed=0, D=5, **kw):
    torch.manual_seed(seed)
    loss = DynamicFeatureRegularizedLoss(3, feature_channels=D, embed_dim=4, hidden=6, **kw).double()
    return loss


def test_dfr_matches_plain_loop_reference_values_and_gradients():
    logits, target, rgb = make_batch(H=4, W=6, labelled=0.5, seed=1)
    target[1] = IGNORE  # an image without labelled pairs is left out of the consistency mean
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(weight=0.02, sigma_rgb=40.0, sigma_xy=3.0, deep_weight=0.7, sigma_deep=0.8, consistency_weight=0.5,
              scale=1.0)
    loss = make_dfr(**kw)
    impl = loss(logits, torch.as_tensor(target), image=torch.as_tensor(rgb), features=features)

    reg = logits.new_zeros(())
    for n in range(2):
        cells = ref_embeddings(loss.head, features, n, 1)
        K = ref_dfr_kernel(rgb[n], [c.detach().numpy() for c in cells], 1, 4, 6, 40.0, 3.0, 0.8, 0.7)
        reg = reg + ref_potts(ref_block_probs(logits, n, 1), K)
    fc, pairs = ref_consistency(ref_embeddings(loss.head, features, 0, 1), target[0], 0.8)
    assert pairs > 10
    ref = ref_partial_ce(logits, target) + 0.02 * reg / 2 + 0.5 * fc
    assert impl.item() == pytest.approx(ref.item(), rel=1e-9)

    params = [logits, features, *loss.head.parameters()]
    g_impl = torch.autograd.grad(impl, params)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g_impl, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)
    assert g_impl[1].abs().sum() > 0  # the backbone features learn through the consistency head


def test_dfr_kernel_term_on_the_half_scale_grid():
    logits, target, rgb = make_batch(H=4, W=8, seed=2)
    features = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    kw = dict(weight=0.05, sigma_rgb=30.0, sigma_xy=5.0, deep_weight=2.0, sigma_deep=0.6, consistency_weight=0.0,
              scale=0.5)
    loss = make_dfr(**kw)
    v_impl, g_impl = grads(lambda: loss(logits, torch.as_tensor(target), image=torch.as_tensor(rgb),
                                        features=features), logits)

    def ref():
        reg = logits.new_zeros(())
        for n in range(2):
            # features are resized bilinearly after the head; at an exact factor 2 that is the cell mean
            cells = ref_embeddings(loss.head, features, n, 2)
            K = ref_dfr_kernel(rgb[n], [c.detach().numpy() for c in cells], 2, 4, 8, 30.0, 5.0, 0.6, 2.0)
            reg = reg + ref_potts(ref_block_probs(logits, n, 2), K)
        return ref_partial_ce(logits, target) + 0.05 * reg / 2

    v_ref, g_ref = grads(ref, logits)
    assert v_impl.item() == pytest.approx(v_ref.item(), rel=1e-9)
    assert torch.allclose(g_impl, g_ref, rtol=1e-8, atol=1e-11)


def test_dfr_consistency_uses_labelled_shares_on_a_coarser_grid():
    # 2 x 2 cells fully labelled with one class each behave like single labelled pixels
    target = np.full((1, 4, 4), IGNORE)
    target[0, :2, :2], target[0, :2, 2:], target[0, 2:, :2] = 0, 1, 0
    features = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    loss = make_dfr(weight=0.0, consistency_weight=1.0, scale=0.5, sigma_deep=0.7)
    logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    impl = loss(logits, torch.as_tensor(target), image=torch.zeros(1, 3, 4, 4, dtype=torch.float64),
                features=features)
    cells = ref_embeddings(loss.head, features, 0, 2)
    fc, pairs = ref_consistency(cells, np.array([[0, 1], [0, IGNORE]]), 0.7)
    assert pairs == 6
    assert impl.item() == pytest.approx((ref_partial_ce(logits, target) + fc).item(), rel=1e-9)


def test_dfr_declares_needs_and_rejects_bad_parameters():
    assert DynamicFeatureRegularizedLoss.needs == frozenset({"image", "features"})
    for kw, name in (({"sigma_deep": 0.0}, "sigma_deep"), ({"deep_weight": -1.0}, "deep_weight"),
                     ({"embed_dim": 0}, "embed_dim"), ({"feature_channels": 0}, "feature_channels")):
        with pytest.raises(ValueError, match=name):
            DynamicFeatureRegularizedLoss(3, **kw)
    logits, target, rgb = make_batch()
    with pytest.raises(ValueError, match="features"):
        DynamicFeatureRegularizedLoss(3)(logits, torch.as_tensor(target), image=torch.as_tensor(rgb))


def test_dfr_lazy_head_and_training_step_lowers_the_loss():
    torch.manual_seed(0)
    logits_net = torch.nn.Conv2d(3, 3, 3, padding=1)
    feat_net = torch.nn.Conv2d(3, 8, 3, padding=1)
    loss = DynamicFeatureRegularizedLoss(3, weight=1e-4, sigma_xy=5.0, scale=1.0)
    _, target, rgb = make_batch(H=8, W=8, labelled=0.4)
    img = torch.as_tensor(rgb, dtype=torch.float32)
    x = img / 255.0
    loss(logits_net(x), torch.as_tensor(target), image=img, features=feat_net(x))  # materialises the head
    opt = torch.optim.SGD([*logits_net.parameters(), *feat_net.parameters(), *loss.parameters()], lr=0.1)
    values = []
    for _ in range(15):
        opt.zero_grad()
        v = loss(logits_net(x), torch.as_tensor(target), image=img, features=feat_net(x))
        v.backward()
        opt.step()
        values.append(v.item())
    assert values[-1] < 0.9 * values[0]

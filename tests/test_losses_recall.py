"""Recall loss and recall-focal loss against plain-loop references of the paper's formula
(Tian et al., ICRA 2022) and of the released / development code's arithmetic.

The references use argmax predictions pixel by pixel (the library uses the max-logit shortcut), on
logits drawn without ties, with ignored pixels (255) and classes absent from the batch; values,
gradients (torch.autograd.grad) and the weights exposed in ``last_weights`` are compared.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from tests.loss_helpers import ce_px, pixels
from study.losses import build_loss

RECALL_FAMILY = ("recall", "recall_focal")

IGNORE = 255
SHAPES = [(2, 5, 4, 6), (1, 3, 5, 5), (3, 7, 3, 4)]


def make_batch(shape, seed=0, absent=(1,), ignore_frac=0.25, dtype=torch.float64):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(2.0).to(dtype)
    classes = torch.tensor([k for k in range(c) if k not in absent])
    t = classes[torch.randint(len(classes), (n, h, w), generator=g)]
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    t[0, 0, 0] = classes[0]
    return x.requires_grad_(), t






def ref_counts(x, t):
    c = x.shape[1]
    fn, gt = [0] * c, [0] * c
    for a, i, j, y in pixels(t):
        gt[y] += 1
        if int(x[a, :, i, j].argmax()) != y:
            fn[y] += 1
    return fn, gt


def ref_paper_weights(fn, gt):
    return [f / g if g > 0 else 0.0 for f, g in zip(fn, gt)]


def ref_released_weights(fn, gt):
    """The released arithmetic: counters start at 1, the counts of occurring classes overwrite them."""
    gt_counter = [1.0] * len(gt)
    fn_counter = [1.0] * len(gt)
    for k in range(len(gt)):
        if gt[k] > 0:
            gt_counter[k] = float(gt[k])
        if fn[k] > 0:
            fn_counter[k] = float(fn[k])
    return [f / g for f, g in zip(fn_counter, gt_counter)]


def focal_weight(ce, gamma, detached):
    """(1 - exp(-CE))^gamma: a tensor of the logits, or (development code) a plain number."""
    if detached:
        return (1.0 - math.exp(-float(ce.detach()))) ** gamma
    return (1 - torch.exp(-ce)) ** gamma


def ref_loss(x, t, w, gamma=None, over_all_pixels=False, detached=False):
    total = 0.0
    for a, i, j, y in pixels(t):
        ce = ce_px(x, a, i, j, y)
        mod = 1.0 if gamma is None else focal_weight(ce, gamma, detached)
        total = total + mod * w[y] * ce
    den = t.numel() if over_all_pixels else int((t != IGNORE).sum())
    return total / den


def grad_of(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


def check(ours, ref, x, loss_mod, w_ref, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=rtol, atol=atol)
    lw = loss_mod.last_weights
    assert lw.shape == (x.shape[1],) and not lw.requires_grad and lw.device == x.device
    torch.testing.assert_close(lw, torch.tensor(w_ref, dtype=lw.dtype), rtol=1e-6, atol=1e-7)


FAMILY = [("recall", {}, None), ("recall_focal", {}, 1.0), ("recall_focal", {"gamma": 2.0}, 2.0),
          ("recall_focal", {"gamma": 0.0}, 0.0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params,gamma", FAMILY)
def test_paper_form_matches_loop(shape, name, params, gamma):
    x, t = make_batch(shape, seed=1)
    loss = build_loss(name, shape[1], **params)
    fn, gt = ref_counts(x, t)
    w = ref_paper_weights(fn, gt)
    assert w[1] == 0.0  # class 1 is absent
    check(loss(x, t), ref_loss(x, t, w, gamma), x, loss, w)
    # float32 logits give the same numbers to float32 precision
    x32 = x.detach().float().requires_grad_()
    torch.testing.assert_close(loss(x32, t).double(), ref_loss(x, t, w, gamma).detach(), rtol=1e-5, atol=1e-6)


def test_class_without_false_negatives_gets_weight_zero():
    x, t = make_batch((2, 4, 5, 5), seed=2, absent=(3,))
    with torch.no_grad():
        x[:, 2] = torch.where(t == 2, 50.0, x[:, 2])  # every class-2 pixel predicted right
    loss = build_loss("recall", 4)
    value = loss(x, t)
    fn, gt = ref_counts(x, t)
    assert fn[2] == 0 and gt[2] > 0 and gt[3] == 0
    assert loss.last_weights[2] == 0 and loss.last_weights[3] == 0
    w = ref_paper_weights(fn, gt)
    check(value, ref_loss(x, t, w), x, loss, w)


def test_tie_with_target_logit_counts_as_correct():
    # the max-logit shortcut: a pixel is a false negative only when some logit is strictly larger
    x = torch.tensor([[[[1.0]], [[3.0]], [[3.0]]]])  # classes 1 and 2 tie
    loss = build_loss("recall", 3)
    loss(x, torch.tensor([[[2]]]))
    assert loss.last_weights.tolist() == [0.0, 0.0, 0.0]
    loss(x, torch.tensor([[[0]]]))
    assert loss.last_weights.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name,params,gamma", FAMILY[:3])
def test_official_compat_matches_released_arithmetic(name, params, gamma):
    """Released recall loss / development recall-focal: counters from 1, mean over all N*H*W pixels,
    and for recall-focal p = exp(-CE).detach(), loss = (1 - p)^gamma * w[target] * CE."""
    for seed, shape in enumerate(SHAPES):
        x, t = make_batch(shape, seed=10 + seed)
        with torch.no_grad():  # make one present class free of false negatives: weight 1/GT_c
            x[:, 0] = torch.where(t == 0, 50.0, x[:, 0])
        loss = build_loss(name, shape[1], official_compat=True, **params)
        fn, gt = ref_counts(x, t)
        w = ref_released_weights(fn, gt)
        assert w[1] == 1.0 and gt[0] > 0 and w[0] == pytest.approx(1 / gt[0])
        check(loss(x, t), ref_loss(x, t, w, gamma, over_all_pixels=True, detached=True), x, loss, w)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_recall_focal_official_compat_factor_carries_no_gradient(gamma):
    x, t = make_batch((2, 5, 4, 6), seed=15)
    fn, gt = ref_counts(x, t)
    w = ref_released_weights(fn, gt)
    ours = build_loss("recall_focal", 5, gamma=gamma, official_compat=True)(x, t)
    attached = ref_loss(x, t, w, gamma, over_all_pixels=True, detached=False)
    detached = ref_loss(x, t, w, gamma, over_all_pixels=True, detached=True)
    torch.testing.assert_close(ours.detach(), attached.detach())  # same value either way
    g_ours, g_att, g_det = grad_of(ours, x), grad_of(attached, x), grad_of(detached, x)
    torch.testing.assert_close(g_ours, g_det)
    assert (g_ours - g_att).abs().max() > 1e-4  # the detach changes the gradient


def run_ema_reference(batches, c, alpha, compat=False, gamma=None):
    w = [1.0] * c
    out = []
    for x, t in batches:
        fn, gt = ref_counts(x, t)
        r = ref_released_weights(fn, gt) if compat else ref_paper_weights(fn, gt)
        w = [alpha * r[k] + (1 - alpha) * w[k] if gt[k] > 0 else w[k] for k in range(c)]
        out.append((ref_loss(x, t, w, gamma, over_all_pixels=compat, detached=compat), list(w)))
    return out


def ema_batches(c=5):
    absents = [(1,), (1, 3), (), (0, 4), (1,)]  # class 1 absent from several batches
    return [make_batch((2, c, 4, 5), seed=20 + k, absent=a) for k, a in enumerate(absents)]


@pytest.mark.parametrize("name,gamma", [("recall", None), ("recall_focal", 1.0)])
@pytest.mark.parametrize("alpha,compat", [(0.5, False), (0.2, False), (1.0, False), (0.5, True)])
def test_ema_matches_step_by_step_reference(name, gamma, alpha, compat):
    batches = ema_batches()
    loss = build_loss(name, 5, ema=alpha, official_compat=compat)
    refs = run_ema_reference(batches, 5, alpha, compat, gamma)
    for (x, t), (ref, w) in zip(batches, refs):
        check(loss(x, t), ref, x, loss, w)
        torch.testing.assert_close(loss.ema_weights, torch.tensor(w, dtype=torch.float32))
    # the sequence discriminates "update present classes only": class 3 is absent from batch 1 and
    # keeps a weight that an update with ratio 0 (or 1 in compat mode) would have changed
    w0, w1 = refs[0][1][3], refs[1][1][3]
    assert w1 == w0 and w0 not in (0.0, 1.0)


def test_ema_buffer_frozen_in_eval_mode():
    batches = ema_batches()
    loss = build_loss("recall", 5, ema=0.5)
    loss(*batches[0])
    before = loss.ema_weights.clone()
    loss.eval()
    loss(*batches[1])
    torch.testing.assert_close(loss.ema_weights, before)
    expected = run_ema_reference(batches[:2], 5, 0.5)[1][1]  # the would-be update is still applied
    torch.testing.assert_close(loss.last_weights, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(RECALL_FAMILY))
def test_ema_weights_survive_state_dict_round_trip(name):
    batches = ema_batches()
    loss = build_loss(name, 5, ema=0.5)
    for x, t in batches[:3]:
        loss(x, t)
    buf = io.BytesIO()
    torch.save(loss.state_dict(), buf)
    assert "ema_weights" in loss.state_dict()
    resumed = build_loss(name, 5, ema=0.5)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(resumed.ema_weights, loss.ema_weights)
    for x, t in batches[3:]:
        torch.testing.assert_close(resumed(x, t), loss(x, t), rtol=0, atol=0)
        torch.testing.assert_close(resumed.last_weights, loss.last_weights, rtol=0, atol=0)
    fresh = build_loss(name, 5, ema=0.5)
    fresh(*batches[3])
    assert not torch.equal(fresh.last_weights, resumed.last_weights)


@pytest.mark.parametrize("name,params", [(n, p) for n in sorted(RECALL_FAMILY)
                                         for p in ({}, {"ema": 0.5}, {"official_compat": True})
                                         # its detached focal factor is not the value's derivative by design
                                         if not (n == "recall_focal" and p.get("official_compat"))])
def test_gradcheck_with_weights_fixed(name, params):
    # weights are piecewise constant in the logits; with random logits no argmax flips within eps
    x, t = make_batch((2, 3, 3, 4), seed=30, absent=(2,))
    loss = build_loss(name, 3, **params)
    loss.eval()  # keep an EMA buffer fixed across gradcheck's many evaluations
    top2 = x.detach().topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert torch.autograd.gradcheck(lambda inp: loss(inp, t), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(RECALL_FAMILY))
def test_last_weights_exposed_and_detached(name):
    x, t = make_batch((2, 4, 3, 3), seed=40, dtype=torch.float32)
    loss = build_loss(name, 4)
    assert loss.last_weights is None
    loss(x, t).backward()
    lw = loss.last_weights
    assert lw.dtype == torch.float32 and lw.shape == (4,) and lw.grad_fn is None and not lw.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(RECALL_FAMILY))
def test_cuda_matches_cpu(name):
    x, t = make_batch((2, 6, 16, 16), seed=50, dtype=torch.float32)
    cpu = build_loss(name, 6, ema=0.5)
    gpu = build_loss(name, 6, ema=0.5)  # buffer left on the CPU on purpose: it follows the logits
    xg = x.detach().cuda().requires_grad_()
    for _ in range(2):
        a, b = cpu(x, t), gpu(xg, t.cuda())
        torch.testing.assert_close(b.cpu(), a.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gpu.last_weights.cpu(), cpu.last_weights)
        torch.testing.assert_close(grad_of(b, xg).cpu(), grad_of(a, x), rtol=1e-5, atol=1e-7)
    assert gpu.last_weights.device.type == "cuda"


def run_development_ema_reference(batches, c, alpha, compat=False):
    """The development code's EMA as the issue states it: the first batch's raw ratio (absent classes
    keep their counter value 1), then w <- alpha*r + (1-alpha)*w for present classes."""
    w, out = None, []
    for x, t in batches:
        fn, gt = ref_counts(x, t)
        r = ref_released_weights(fn, gt) if compat else ref_paper_weights(fn, gt)
        if w is None:
            w = [r[k] if gt[k] > 0 else 1.0 for k in range(c)]
        else:
            w = [alpha * r[k] + (1 - alpha) * w[k] if gt[k] > 0 else w[k] for k in range(c)]
        out.append((ref_loss(x, t, w, None, over_all_pixels=compat, detached=compat), list(w)))
    return out


@pytest.mark.parametrize("alpha,compat", [(0.5, False), (0.2, True)])
def test_ema_start_first_batch_matches_development_reference(alpha, compat):
    batches = ema_batches()
    loss = build_loss("recall", 5, ema=alpha, official_compat=compat, ema_start="first_batch")
    refs = run_development_ema_reference(batches, 5, alpha, compat)
    for (x, t), (ref, w) in zip(batches, refs):
        check(loss(x, t), ref, x, loss, w)
    # the first batch differs from the default start (ones mixed in)
    ones = build_loss("recall", 5, ema=alpha, official_compat=compat)
    ones(*batches[0])
    assert not torch.allclose(ones.last_weights.float(), torch.tensor(refs[0][1]))


def test_ema_start_first_batch_resumes_and_reads_old_checkpoints():
    batches = ema_batches()
    loss = build_loss("recall", 5, ema=0.5, ema_start="first_batch")
    loss(*batches[0])
    state = loss.state_dict()
    resumed = build_loss("recall", 5, ema=0.5, ema_start="first_batch")
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(*batches[1]), loss(*batches[1]), rtol=0, atol=0)
    old = {k: v for k, v in state.items() if k != "ema_started"}  # written before the option existed
    from_old = build_loss("recall", 5, ema=0.5, ema_start="first_batch")
    from_old.load_state_dict(old)
    assert bool(from_old.ema_started)


def test_ema_start_without_ema_is_refused():
    with pytest.raises(ValueError, match="ema_start"):
        build_loss("recall", 5, ema_start="first_batch")

"""Loss library: API, CE family, focal, OHEM, Lovász, Dice, soft IoU.

Oracles: F.cross_entropy, kornia's focal_loss, smp's LovaszLoss and DiceLoss, and plain-loop
references written here (python loops over pixels and classes on small inputs), for values and
gradients (torch.autograd.grad), on random inputs with ignored pixels (255) and absent classes.
The recall family is tested in test_losses_recall.py.
"""

from __future__ import annotations

import inspect
import math
import statistics

import kornia
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from tests.loss_helpers import ce_px, pixels
from study.losses import LOSSES, build_loss

NEEDS_CLASS_COUNTS = {n for n, e in LOSSES.items() if "class_counts" in e.needs}
from study.losses._functional import count_bins, scatter_count

IGNORE = 255
SHAPES = [(2, 5, 4, 6), (1, 3, 5, 5), (3, 7, 3, 4)]
COUNTS = {5: [120, 0, 3000, 45, 7], 3: [10, 200, 3000], 7: [5, 1000, 0, 30, 30, 400, 2]}


def make_batch(shape, seed=0, absent=(1,), ignore_frac=0.25, dtype=torch.float64, scale=2.0):
    """Logits (no ties) and a target with ignored pixels; classes in ``absent`` never occur."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)
    classes = torch.tensor([k for k in range(c) if k not in absent])
    t = classes[torch.randint(len(classes), (n, h, w), generator=g)]
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    t[0, 0, 0] = classes[0]  # at least one valid pixel
    return x.requires_grad_(), t






def grad_of(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


def assert_close_with_grad(ours, ref, x, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(ours.detach(), ref.detach().to(ours.dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_of(ours, x), grad_of(ref, x), rtol=rtol, atol=atol)


def build(name, c, **kw):
    if name in NEEDS_CLASS_COUNTS and "class_counts" not in kw:
        kw["class_counts"] = COUNTS.get(c, [10] * c)
    if name == "semeda":  # standalone: the synthetic-blob edge net (the trainer supplies the training masks)
        kw.setdefault("edge_net", "blobs")
    loss = build_loss(name, c, **kw)
    needs = LOSSES[name].needs & {"image", "features"}
    return WithRunInputs(loss, needs) if needs else loss


class WithRunInputs(torch.nn.Module):
    """Calls a loss that needs the image / the network's features with fixed ones, as the trainer would."""

    def __init__(self, loss, needs):
        super().__init__()
        self.loss, self.needs = loss, needs

    def forward(self, x, t):
        n, _, h, w = x.shape
        g = torch.Generator().manual_seed(0)
        extra = {}
        if "image" in self.needs:
            extra["image"] = torch.rand(n, 3, h, w, generator=g).mul(255).to(x.device)
        if "features" in self.needs:
            extra["features"] = torch.randn(n, 4, h, w, generator=g).to(x.device)
        return self.loss(x, t, **extra)


# ---------------------------------------------------------------- API


def test_class_count_needs_match_the_constructors():
    required = {n for n, e in LOSSES.items()
                if inspect.signature(e.build.__init__).parameters.get("class_counts") is not None
                and inspect.signature(e.build.__init__).parameters["class_counts"].default is inspect.Parameter.empty}
    assert NEEDS_CLASS_COUNTS == required == {"weighted_ce", "class_balanced"}
    assert {n for n, e in LOSSES.items() if e.extra.get("tracks_weights")} == {"recall", "recall_focal"}
    for name, e in LOSSES.items():
        assert e.build.__doc__ and len(e.build.__doc__) > 40, name  # every loss documents its formula


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_loss("recal", 5)
    for name in LOSSES:
        assert repr(name) in str(err.value)


def test_unknown_param_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        build_loss("focal", 5, gama=2)
    msg = str(err.value)
    assert "'gama'" in msg and "'gamma'" in msg and "'alpha'" in msg


@pytest.mark.parametrize("name", sorted(NEEDS_CLASS_COUNTS))
def test_missing_class_counts(name):
    with pytest.raises(ValueError, match="class_counts"):
        build_loss(name, 5)


@pytest.mark.parametrize("name,params,key", [
    ("weighted_ce", {"class_counts": [1, 2, 3, 4, 5], "scheme": "mean"}, "scheme"),
    ("weighted_ce", {"class_counts": [1, 2, 3]}, "class_counts"),
    ("weighted_ce", {"class_counts": [1, 2, 3, 4, 5], "reduction": "sum"}, "reduction"),
    ("class_balanced", {"class_counts": [1, 2, 3, 4, 5], "beta": 1.5}, "beta"),
    ("focal", {"gamma": -1.0}, "gamma"),
    ("focal", {"alpha": [1.0, 2.0]}, "alpha"),
    ("focal", {"gamma": "two"}, "gamma"),
    ("focal", {"gamma": float("inf")}, "gamma: inf is not allowed"),
    ("ohem", {"thresh": 0.0}, "thresh"),
    ("ohem", {"min_kept": -3}, "min_kept"),
    ("dice", {"smooth": -1.0}, "smooth"),
    ("recall", {"ema": 1.5}, "ema"),
    ("recall_focal", {"gamma": -2.0}, "gamma"),
])
def test_invalid_values_raise_value_error(name, params, key):
    with pytest.raises(ValueError, match=key):
        build_loss(name, 5, **params)


def test_ignore_index_collision_and_shape_errors():
    with pytest.raises(ValueError, match="ignore_index"):
        build_loss("ce", 5, ignore_index=3)
    loss = build_loss("ce", 5)
    with pytest.raises(ValueError, match="num_classes"):
        loss(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(1, 5, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_ignored_batch_gives_attached_zero(name):
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    t = torch.full((2, 3, 4), IGNORE)
    loss = build(name, 5)(x, t)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    if LOSSES[name].extra.get("label_free_term"):
        # a regularized loss keeps its pairwise term, which uses no labels: the partial CE part is 0
        ce_part = build_loss(name, 5, weight=0.0, **({"consistency_weight": 0.0} if name == "dfr" else {}))
        assert float(WithRunInputs(ce_part, LOSSES[name].needs)(x, t).detach()) == 0.0
        assert loss.grad_fn is not None and math.isfinite(float(loss.detach()))
        return
    assert loss.grad_fn is not None and float(loss.detach()) == 0.0
    g = grad_of(loss, x)
    assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_autocast_bf16_computes_in_float32(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    img = torch.randn(2, 3, 6, 8)
    _, t = make_batch((2, 5, 6, 8), seed=3)
    loss_fn = build(name, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(img)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    reference = build(name, 5)
    reference.load_state_dict(loss_fn.state_dict())  # same learned parts (DFR's head), same buffers
    expected = reference(logits.detach().float(), t)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_counting_paths_agree():
    idx = torch.randint(0, 13, (5000,))
    torch.testing.assert_close(count_bins(idx, 13), scatter_count(idx, 13))
    torch.testing.assert_close(count_bins(idx, 13), torch.tensor([(idx == k).sum() for k in range(13)]))


# ---------------------------------------------------------------- CE family


@pytest.mark.parametrize("shape", SHAPES)
def test_ce_matches_torch(shape):
    x, t = make_batch(shape, seed=1)
    ours = build_loss("ce", shape[1])(x, t)
    ref = F.cross_entropy(x, t, ignore_index=IGNORE)
    assert_close_with_grad(ours, ref, x)
    x32 = x.detach().float().requires_grad_()
    assert_close_with_grad(build_loss("ce", shape[1])(x32, t), F.cross_entropy(x32, t, ignore_index=IGNORE),
                           x32, rtol=1e-5, atol=1e-6)


def ref_static_weights(counts, scheme, beta=None):
    c = len(counts)
    total = sum(counts)
    if scheme == "median":
        freq = [k / total for k in counts]
        med = statistics.median([f for f, k in zip(freq, counts) if k > 0])
        return [med / f if k > 0 else 0.0 for f, k in zip(freq, counts)]
    if scheme == "inverse":
        return [total / (c * k) if k > 0 else 0.0 for k in counts]
    beta = (total - 1) / total if beta is None else beta
    raw = [(1 - beta) / (1 - beta ** k) if k > 0 else 0.0 for k in counts]
    return [r * c / sum(raw) for r in raw]


def ref_weighted_ce(x, t, w, reduction):
    num = den = 0.0
    nvalid = 0
    for a, i, j, y in pixels(t):
        num = num + w[y] * ce_px(x, a, i, j, y)
        den += w[y]
        nvalid += 1
    return num / (den if reduction == "weighted" else nvalid)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,scheme", [("weighted_ce", "median"), ("weighted_ce", "inverse"),
                                         ("class_balanced", None), ("class_balanced", 0.99)])
@pytest.mark.parametrize("reduction", ["weighted", "mean"])
def test_static_weighted_ce_matches_loop(shape, name, scheme, reduction):
    c = shape[1]
    counts = COUNTS[c]
    x, t = make_batch(shape, seed=2, absent=(c - 1,))
    if name == "weighted_ce":
        loss = build_loss(name, c, class_counts=counts, scheme=scheme, reduction=reduction)
        w = ref_static_weights(counts, scheme)
    else:
        loss = build_loss(name, c, class_counts=counts, beta=scheme, reduction=reduction)
        w = ref_static_weights(counts, "cb", beta=scheme)
        assert math.isclose(sum(w), c)
    torch.testing.assert_close(loss.weight, torch.tensor(w, dtype=torch.float32))
    ours = loss(x, t)
    assert_close_with_grad(ours, ref_weighted_ce(x, t, w, reduction), x, rtol=1e-5, atol=1e-7)
    if reduction == "weighted":  # torch's weighted CE is the released code's reduction
        ref = F.cross_entropy(x, t, weight=torch.tensor(w, dtype=x.dtype), ignore_index=IGNORE)
        assert_close_with_grad(ours, ref, x, rtol=1e-5, atol=1e-7)


def test_class_balanced_default_beta_is_total_pixels():
    counts = [10**9, 10**6, 10**3, 1, 0]
    loss = build_loss("class_balanced", 5, class_counts=counts)
    total = sum(counts)
    beta = (total - 1) / total
    # -expm1(n log beta) is the accurate form of 1 - beta^n for beta close to 1
    raw = [(1 - beta) / -math.expm1(k * math.log(beta)) if k else 0.0 for k in counts]
    torch.testing.assert_close(loss.weight.double(), torch.tensor([r * 5 / sum(raw) for r in raw], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert loss.weight[-1] == 0 and float(loss.weight.sum()) == pytest.approx(5.0)


# ---------------------------------------------------------------- focal


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_focal_matches_kornia(shape, gamma, with_alpha):
    c = shape[1]
    x, t = make_batch(shape, seed=4)
    alpha = [0.25 + 0.5 * k for k in range(c)] if with_alpha else None
    ours = build_loss("focal", c, gamma=gamma, alpha=alpha)(x, t)
    # kornia: per-class map (alpha=None weights every class by 1; `weight` scales class slices),
    # ignored pixels are 0; summed over classes, averaged over valid pixels
    kw = {"weight": torch.tensor(alpha, dtype=x.dtype)} if with_alpha else {}
    fmap = kornia.losses.focal_loss(x, t, alpha=None, gamma=gamma, reduction="none", ignore_index=IGNORE, **kw)
    ref = fmap.sum(1).sum() / (t != IGNORE).sum()
    assert_close_with_grad(ours, ref, x, rtol=1e-6, atol=1e-8)
    # and a plain loop
    loop = sum((1 - torch.exp(-ce_px(x, a, i, j, y))) ** gamma * ce_px(x, a, i, j, y) * (alpha[y] if alpha else 1)
               for a, i, j, y in pixels(t)) / (t != IGNORE).sum()
    assert_close_with_grad(ours, loop, x, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_focal_official_compat_is_the_focal_factor_of_the_batch_mean_ce(shape, gamma, with_alpha):
    """Released FocalLoss: ce = CrossEntropyLoss(weight, ignore_index)(x, t); (1 - exp(-ce))^gamma * ce."""
    c = shape[1]
    x, t = make_batch(shape, seed=14)
    alpha = [0.25 + 0.5 * k for k in range(c)] if with_alpha else None
    ours = build_loss("focal", c, gamma=gamma, alpha=alpha, official_compat=True)(x, t)
    # plain loop over the valid pixels
    w = [alpha[y] if alpha else 1.0 for _, _, _, y in pixels(t)]
    ce = sum(wk * ce_px(x, a, i, j, y) for wk, (a, i, j, y) in zip(w, pixels(t))) / sum(w)
    loop = (1 - torch.exp(-ce)) ** gamma * ce
    assert_close_with_grad(ours, loop, x)
    # torch's CE module, as the released code builds it
    kw = {"weight": torch.tensor(alpha, dtype=x.dtype)} if with_alpha else {}
    ce_torch = F.cross_entropy(x, t, ignore_index=IGNORE, **kw)
    assert_close_with_grad(ours, (1 - torch.exp(-ce_torch)) ** gamma * ce_torch, x)
    if gamma > 0:  # not the per-pixel focal loss
        per_pixel = build_loss("focal", c, gamma=gamma, alpha=alpha)(x, t)
        assert abs(float((per_pixel - ours).detach())) > 1e-3


def test_focal_official_compat_all_ignored_has_finite_zero_gradient_for_small_gamma():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = build_loss("focal", 4, gamma=0.5, official_compat=True)(x, torch.full((2, 3, 3), IGNORE))
    assert float(loss.detach()) == 0.0
    assert (grad_of(loss, x) == 0).all()


# ---------------------------------------------------------------- OHEM


def ref_ohem(x, t, thresh, min_kept):
    items = [(float(torch.exp(-ce_px(x, a, i, j, y)).detach()), ce_px(x, a, i, j, y)) for a, i, j, y in pixels(t)]
    probs = sorted(p for p, _ in items)
    k = min(min_kept, len(probs) - 1)
    tau = max(thresh, probs[k])
    kept = [ce for p, ce in items if p < tau]
    return sum(kept) / len(kept) if kept else x.sum() * 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 0), (0.7, 10), (0.3, 5), (0.1, 10**6), (0.9, 3)])
def test_ohem_matches_loop(shape, thresh, min_kept):
    x, t = make_batch(shape, seed=5, scale=3.0)
    ours = build_loss("ohem", shape[1], thresh=thresh, min_kept=min_kept)(x, t)
    assert_close_with_grad(ours, ref_ohem(x, t, thresh, min_kept), x)


@pytest.mark.parametrize("shape", SHAPES + [(6, 4, 3, 5)])
def test_ohem_official_compat_topk_along_width(shape):
    n, c, h, w = shape
    x, t = make_batch(shape, seed=6)
    ours = build_loss("ohem", c, thresh=0.7, official_compat=True)(x, t)
    k = min(max(int(0.7 * n), 1), w)
    kept = []
    for a in range(n):
        for i in range(h):
            row = [ce_px(x, a, i, j, int(t[a, i, j])) if int(t[a, i, j]) != IGNORE else x.sum() * 0
                   for j in range(w)]
            kept += sorted(row, key=lambda v: float(v.detach()), reverse=True)[:k]
    assert_close_with_grad(ours, sum(kept) / len(kept), x)


@pytest.mark.parametrize("shape", SHAPES + [(6, 4, 3, 5)])
def test_ohem_official_compat_thresh_one_is_the_plain_mean_over_all_pixels(shape):
    """Released OhemCrossEntropy2d: `if self.top_k == 1: return torch.mean(loss)` on the
    reduction='none' CE map, whose ignored pixels are 0 but still counted."""
    n, c, h, w = shape
    x, t = make_batch(shape, seed=16)
    ours = build_loss("ohem", c, thresh=1.0, official_compat=True)(x, t)
    loop = sum(ce_px(x, a, i, j, y) for a, i, j, y in pixels(t)) / (n * h * w)
    assert_close_with_grad(ours, loop, x)
    assert (t == IGNORE).any()  # so the all-pixel denominator differs from the valid-pixel one


# ---------------------------------------------------------------- Lovász, Dice, soft IoU


@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 8, 8)])
@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_matches_smp(shape, per_image):
    # float32: smp's Lovász gradient casts to float32 internally
    x, t = make_batch(shape, seed=7, dtype=torch.float32)
    t[:, 0, 0] = 0  # smp's per-image mean breaks on an image without valid pixels
    ours = build_loss("lovasz", shape[1], per_image=per_image)(x, t)
    ref = smp.losses.LovaszLoss("multiclass", per_image=per_image, ignore_index=IGNORE, from_logits=True)(x, t)
    assert_close_with_grad(ours, ref, x, rtol=1e-5, atol=1e-6)


def test_lovasz_per_image_counts_empty_image_as_zero():
    x, t = make_batch((3, 4, 5, 5), seed=8, dtype=torch.float32)
    t[1] = IGNORE
    ours = build_loss("lovasz", 4, per_image=True)(x, t)
    ref = smp.losses.LovaszLoss("multiclass", per_image=False, ignore_index=IGNORE)
    expected = (ref(x[0:1], t[0:1]) + ref(x[2:3], t[2:3])) / 3
    assert_close_with_grad(ours, expected, x, rtol=1e-5, atol=1e-6)


def ref_dice(x, t, smooth):
    c = x.shape[1]
    p = x.softmax(1)
    terms = []
    for k in range(c):
        inter = psum = ysum = 0.0
        for a, i, j, y in pixels(t):
            inter = inter + p[a, k, i, j] * (y == k)
            psum = psum + p[a, k, i, j]
            ysum += y == k
        if ysum > 0:
            terms.append(1 - (2 * inter + smooth) / (psum + ysum + smooth))
    return sum(terms) / len(terms), len(terms)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_dice_matches_loop_and_smp(shape, smooth):
    c = shape[1]
    x, t = make_batch(shape, seed=9)
    ours = build_loss("dice", c, smooth=smooth)(x, t)
    ref, n_present = ref_dice(x, t, smooth)
    assert_close_with_grad(ours, ref, x)
    if smooth == 0.0:  # smp averages over all C classes, absent ones counted as 0
        smp_loss = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE, smooth=0.0, eps=1e-12)
        assert_close_with_grad(ours, smp_loss(x, t) * c / n_present, x)


def ref_soft_iou(x, t):
    n, c, h, w = x.shape
    p = x.softmax(1)
    total = 0.0
    for a in range(n):
        for k in range(c):
            inter = union = 0.0
            for b, i, j, y in pixels(t):
                if b != a:
                    continue
                yk = float(y == k)
                inter = inter + p[a, k, i, j] * yk
                union = union + p[a, k, i, j] + yk - p[a, k, i, j] * yk
            total = total + inter / (union + 1e-16)
    return 1 - total / (n * c)


@pytest.mark.parametrize("shape", SHAPES)
def test_soft_iou_matches_loop(shape):
    x, t = make_batch(shape, seed=10)
    t[-1, :, :] = IGNORE if shape[0] > 1 else t[-1]  # an image without valid pixels counts 0 per class
    assert_close_with_grad(build_loss("soft_iou", shape[1])(x, t), ref_soft_iou(x, t), x)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name,params", [
    ("ce", {}),
    ("weighted_ce", {"scheme": "median"}),
    ("weighted_ce", {"scheme": "inverse", "reduction": "mean"}),
    ("class_balanced", {}),
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 1.0, "alpha": [0.5, 1.0, 2.0]}),
    ("focal", {"gamma": 1.0, "official_compat": True}),
    ("dice", {}),
    ("dice", {"smooth": 1.0}),
    ("soft_iou", {}),
])
def test_gradcheck_smooth_losses(name, params):
    x, t = make_batch((2, 3, 3, 4), seed=11, absent=(2,))
    loss = build(name, 3, **params)
    assert torch.autograd.gradcheck(lambda inp: loss(inp, t), (x,), eps=1e-6, atol=1e-6)

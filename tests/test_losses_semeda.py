"""SEMEDA: edge targets on a hand-made 3x3 map, the loss against an independent forward of the edge network
(F.conv2d with its weights) for values and gradients, a frozen network, perfect predictions, ignored pixels,
the on-disk cache (second build does not retrain, key changes with the training parameters), loading from
``edge_net_path``, the global RNG left alone, parameter checks. Edge nets are trained for a few steps only."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from study.losses import build_loss
from tests.loss_helpers import random_batch


def make_batch(shape, seed, absent=(1,), ignore_frac=0.2):
    return random_batch(shape, seed, absent, ignore_frac)
from study.losses._functional import extended_target
from study.losses.semeda import BlobMasks, edge_targets, load_edge_net, train_edge_net

IGNORE = 255
STEPS = 15


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "semeda-cache"


def build(cache, c=4, **kw):
    return build_loss("semeda", c, cache_dir=str(cache), train_steps=STEPS, widths=[4, 8], **{"edge_net": "blobs", **kw})


def test_edge_targets_hand_case():
    t = torch.zeros(1, 3, 4, dtype=torch.long)
    t[0, 1, 1] = 1
    t[0, :, 3] = IGNORE
    e = edge_targets(extended_target(t, 2, IGNORE), 2)
    assert e[0, 1].tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    # class-0 pixels next to the class-1 pixel are edges; column 2 only touches ignored pixels on its right
    assert e[0, 0].tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0]]
    t[0, 1, 1] = 0
    assert edge_targets(extended_target(t, 2, IGNORE), 2).sum() == 0  # ignored neighbours are not 'other'


def reference_features(net, m):
    feats = []
    for i, block in enumerate(net.blocks):
        if i > 0:
            m = F.max_pool2d(m, 2, ceil_mode=True)
        c1, c2 = block[0], block[2]
        m = F.conv2d(m, c1.weight, c1.bias, padding=1).clamp_min(0)
        m = F.conv2d(m, c2.weight, c2.bias, padding=1).clamp_min(0)
        feats.append(m)
    return feats




@pytest.mark.parametrize("distance,weight", [("l1", 1.0), ("l2", 0.3)])
def test_matches_independent_forward_and_net_is_frozen(cache, distance, weight):
    loss_fn = build(cache, distance=distance, weight=weight)
    x, t = make_batch((2, 4, 9, 13), seed=1)
    ours = loss_fn(x, t)
    net = loss_fn.edge_net
    valid = (t != IGNORE).unsqueeze(1).double()
    p = torch.softmax(x, 1) * valid
    y = F.one_hot(torch.where(t == IGNORE, 0, t), 4).permute(0, 3, 1, 2).double() * valid
    diffs = [fp - fy for fp, fy in zip(reference_features(net, p), reference_features(net, y))]
    term = sum((d.abs() if distance == "l1" else d ** 2).mean() for d in diffs)
    ref = F.cross_entropy(x, t, ignore_index=IGNORE) + weight * term
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g1, g2 = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (ours, ref))
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert (g1.permute(0, 2, 3, 1)[t == IGNORE] == 0).all()
    ours.backward()
    assert all(not q.requires_grad and q.grad is None for q in net.parameters())
    assert float(term.detach()) > 0


def test_perfect_prediction_and_finite_gradients(cache):
    loss_fn = build(cache)
    x, t = make_batch((2, 4, 12, 12), seed=2)
    onehot = F.one_hot(torch.where(t == IGNORE, 0, t), 4).permute(0, 3, 1, 2).float()
    perfect = float(loss_fn(onehot * 30.0, t))
    assert perfect < 1e-6
    xe = (x.detach().float() * 40).requires_grad_()
    loss = loss_fn(xe, t)
    loss.backward()
    assert float(loss.detach()) > 1.0 and torch.isfinite(xe.grad).all()


def test_cache_reuse_and_key(cache, caplog):
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="study.models.edge_net"):
        net1, path1 = train_edge_net(3, None, STEPS, widths=(4, 8), cache_dir=cache)
        assert "training SEMEDA edge net" in caplog.text
        mtime = path1.stat().st_mtime_ns
        caplog.clear()
        net2, path2 = train_edge_net(3, None, STEPS, widths=(4, 8), cache_dir=cache)
        assert "training SEMEDA" not in caplog.text  # loaded, not retrained
        build_loss("semeda", 3, cache_dir=str(cache), train_steps=STEPS, widths=[4, 8], edge_net="blobs")
        assert "training SEMEDA" not in caplog.text
        _, path3 = train_edge_net(3, None, STEPS + 1, widths=(4, 8), cache_dir=cache)
        assert "training SEMEDA" in caplog.text and path3 != path1  # another key
    assert path1 == path2 and path1.stat().st_mtime_ns == mtime
    for a, b in zip(net1.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone


def test_env_cache_dir_and_edge_net_path_from_masks(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "env"))
    masks = BlobMasks(3, 40, 6)(torch.Generator().manual_seed(0))
    net, path = train_edge_net(3, masks, STEPS, widths=(4, 8))
    assert path is not None and path.parent == tmp_path / "env" / "semeda"
    loss_fn = build_loss("semeda", 3, edge_net_path=str(path))
    for a, b in zip(net.state_dict().values(), loss_fn.edge_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="classes"):
        load_edge_net(path, 4)
    with pytest.raises(ValueError, match="edge_net_path"):
        build_loss("semeda", 3, edge_net_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="labels outside"):
        train_edge_net(2, masks, STEPS, widths=(4, 8))


@pytest.mark.parametrize("params,key", [({"weight": -1.0}, "weight"), ({"distance": "cos"}, "distance")])
def test_invalid_params(cache, params, key):
    with pytest.raises(ValueError, match=key):
        build(cache, **params)


def test_default_edge_net_is_trained_on_the_masks_it_is_given(tmp_path):
    """edge_net: train_masks (default) trains on the given label maps and caches by their digest."""
    import numpy as np

    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    masks[:, :, 12:] = 1
    masks[1:, 8:16, :] = 2
    a = build_loss("semeda", 3, cache_dir=str(tmp_path), train_steps=STEPS, widths=[4, 8], train_masks=masks)
    b = build_loss("semeda", 3, cache_dir=str(tmp_path), train_steps=STEPS, widths=[4, 8], train_masks=masks)
    blobs = build_loss("semeda", 3, cache_dir=str(tmp_path), train_steps=STEPS, widths=[4, 8], edge_net="blobs")
    assert a.edge_net_file == b.edge_net_file and a.edge_net_file.is_file()  # one network per set of masks
    assert blobs.edge_net_file != a.edge_net_file
    other = masks.copy()
    other[0, 0, 0] = 2
    c = build_loss("semeda", 3, cache_dir=str(tmp_path), train_steps=STEPS, widths=[4, 8], train_masks=other)
    assert c.edge_net_file != a.edge_net_file  # other data, another network
    with pytest.raises(ValueError, match="edge_net: 'train_masks' needs the training split's masks"):
        build_loss("semeda", 3, cache_dir=str(tmp_path), train_steps=STEPS, widths=[4, 8])

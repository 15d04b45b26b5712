"""ConfusionMatrix against torchmetrics, plain numpy references and cityscapesscripts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from study.metrics import ConfusionMatrix

IGNORE = 255


def _batches(seed: int, num_classes: int, shapes: list[tuple[int, ...]], absent: tuple[int, ...] = ()):
    """Random (pred, target) pairs with ~15 % ignore pixels; classes in ``absent`` never occur in
    the target (some are still predicted)."""
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([c for c in range(num_classes) if c not in absent])
    out = []
    for shape in shapes:
        target = present[torch.randint(len(present), shape, generator=g)]
        target[torch.rand(shape, generator=g) < 0.15] = IGNORE
        # predictions agree with the target ~60 % of the time, otherwise uniform over all classes
        pred = torch.randint(num_classes, shape, generator=g)
        agree = (torch.rand(shape, generator=g) < 0.6) & (target != IGNORE)
        pred[agree] = target[agree]
        out.append((pred, target))
    return out


def _np_confusion(pairs, num_classes: int) -> np.ndarray:
    """Plain-loop reference: rows = ground truth, cols = prediction, ignore / out-of-range dropped."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, target in pairs:
        for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
            if 0 <= t < num_classes and t != IGNORE and 0 <= p < num_classes:
                m[t, p] += 1
    return m


CASES = [
    # (num_classes, shapes of the successive updates, classes absent from the target)
    (5, [(2, 7, 9), (1, 7, 9), (3, 4, 5)], (3,)),
    (19, [(2, 16, 24), (2, 16, 24)], (0, 7, 18)),
    (3, [(1, 1, 13), (4, 3, 3)], ()),
    (16, [(4, 8, 16)], tuple(range(8, 16))),
]


@pytest.mark.parametrize("num_classes,shapes,absent", CASES)
def test_matrix_and_iou_match_torchmetrics(num_classes, shapes, absent):
    pairs = _batches(num_classes, num_classes, shapes, absent)
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    tm_cm = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)
    tm_iou = MulticlassJaccardIndex(num_classes, average=None, ignore_index=IGNORE, zero_division=float("nan"))
    for pred, target in pairs:
        cm.update(pred, target)
        tm_cm.update(pred, target)
        tm_iou.update(pred, target)

    assert cm.mat.dtype == torch.int64 and cm.mat.shape == (num_classes, num_classes)
    torch.testing.assert_close(cm.mat, tm_cm.compute().long(), rtol=0, atol=0)
    assert np.array_equal(cm.mat.numpy(), _np_confusion(pairs, num_classes))

    res = cm.compute()
    np.testing.assert_allclose(res["iou"], tm_iou.compute().double().numpy(), rtol=1e-6, equal_nan=True)
    # classes absent from the target but predicted have IoU 0 (not NaN): torchmetrics agrees above
    for c in absent:
        assert res["iou"][c] == 0.0 or math.isnan(res["iou"][c])
        assert math.isnan(res["recall"][c])

    # mean recall from torchmetrics' matrix (its macro recall would count predicted-but-absent classes)
    tm = tm_cm.compute().double().numpy()
    gt = tm.sum(1)
    ref_recall = np.where(gt > 0, np.diag(tm) / np.where(gt > 0, gt, 1), np.nan)
    np.testing.assert_allclose(res["recall"], ref_recall, rtol=1e-12, equal_nan=True)
    assert res["macc"] == pytest.approx(np.nanmean(ref_recall), rel=1e-12)
    assert res["miou"] == pytest.approx(float(np.nanmean(tm_iou.compute().numpy())), rel=1e-6)


@pytest.mark.parametrize("num_classes,shapes,absent", CASES)
def test_precision_f1_and_summaries_match_numpy_reference(num_classes, shapes, absent):
    pairs = _batches(100 + num_classes, num_classes, shapes, absent)
    cm = ConfusionMatrix(num_classes)
    for pred, target in pairs:
        cm.update(pred, target)
    res = cm.compute()

    m = _np_confusion(pairs, num_classes).astype(np.float64)
    prec, f1, iou = [], [], []
    for c in range(num_classes):
        tp = m[c, c]
        fp = m[:, c].sum() - tp
        fn = m[c, :].sum() - tp
        prec.append(tp / (tp + fp) if tp + fp > 0 else np.nan)
        f1.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else np.nan)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else np.nan)
    np.testing.assert_allclose(res["precision"], prec, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res["f1"], f1, rtol=1e-12, equal_nan=True)
    assert res["mprec"] == pytest.approx(np.nanmean(prec), rel=1e-12)
    assert res["pixel_acc"] == pytest.approx(np.trace(m) / m.sum(), rel=1e-12)
    freq = m.sum(1) / m.sum()
    iou = np.array(iou)
    assert res["fwiou"] == pytest.approx(float((freq[freq > 0] * iou[freq > 0]).sum()), rel=1e-12)
    np.testing.assert_array_equal(res["pixels"], m.sum(1).astype(np.int64))
    for key in ("iou", "recall", "precision", "f1"):
        assert res[key].dtype == np.float64 and res[key].shape == (num_classes,)
    for key in ("miou", "macc", "mprec", "pixel_acc", "fwiou"):
        assert isinstance(res[key], float)


def test_undefined_entries_are_nan_and_empty_matrix():
    cm = ConfusionMatrix(4)
    res = cm.compute()
    assert all(np.isnan(res[k]).all() for k in ("iou", "recall", "precision", "f1"))
    assert math.isnan(res["miou"]) and math.isnan(res["pixel_acc"]) and math.isnan(res["fwiou"])
    # class 2: never in target, never predicted -> NaN everywhere; class 3: predicted, absent -> IoU 0
    cm.update(torch.tensor([[0, 1, 3, 0]]), torch.tensor([[0, 1, 1, 255]]))
    res = cm.compute()
    assert math.isnan(res["iou"][2]) and math.isnan(res["recall"][2]) and math.isnan(res["precision"][2])
    assert res["iou"][3] == 0.0 and math.isnan(res["recall"][3]) and res["precision"][3] == 0.0
    assert res["recall"][1] == 0.5 and res["precision"][1] == 1.0 and res["iou"][1] == 0.5
    assert res["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_out_of_range_labels_are_dropped_and_ignore_index_inside_range():
    # target 7 (>= C) and negative ids are ignored like ignore_index; out-of-range predictions too
    pred = torch.tensor([0, 1, 2, 9, -1, 2, 0])
    target = torch.tensor([0, 7, -3, 1, 1, 2, 255])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.sum().item() == 2 and cm.mat[0, 0].item() == 1 and cm.mat[2, 2].item() == 1
    # an ignore_index inside the class range (e.g. void = 0) is honoured
    cm0 = ConfusionMatrix(3, ignore_index=0)
    cm0.update(pred, target)
    assert cm0.mat[0].sum().item() == 0 and cm0.mat.sum().item() == 1


def test_merge_equals_single_accumulation_and_state_round_trip():
    pairs = _batches(7, 6, [(2, 5, 6), (1, 9, 4), (3, 2, 2), (2, 6, 6)], (5,))
    whole = ConfusionMatrix(6)
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    for i, (pred, target) in enumerate(pairs):
        whole.update(pred, target)
        (a if i % 2 else b).update(pred.to(torch.uint8), target.to(torch.int32))
    assert a.merge(b) is a
    assert torch.equal(a.mat, whole.mat)
    assert a.compute()["miou"] == whole.compute()["miou"]
    with pytest.raises(ValueError, match="5-class"):
        a.merge(ConfusionMatrix(5))

    restored = ConfusionMatrix(6)
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.mat, whole.mat)
    whole.reset()
    assert whole.mat.sum().item() == 0 and restored.mat.sum().item() > 0


def test_shape_and_dtype_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_device_handling():
    cm = ConfusionMatrix(3, device="cpu")
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert cm.mat.device.type == "cpu"
    if torch.cuda.is_available():
        gpu = ConfusionMatrix(3)
        gpu.update(torch.tensor([0, 1], device="cuda"), torch.tensor([0, 2], device="cuda"))
        assert gpu.mat.device.type == "cuda"
        assert torch.equal(gpu.mat.cpu(), cm.mat)
        cm.merge(gpu)
        assert cm.mat.device.type == "cpu" and cm.mat.sum().item() == 4


# ----------------------------------------------------------------------------- cityscapesscripts


def test_iou_matches_cityscapesscripts_pixel_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path))
    if not hasattr(np, "in1d"):  # removed in numpy 2.4, still called by cityscapesscripts
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    from cityscapesscripts.helpers.labels import labels

    eval_ids = [lb.id for lb in labels if 0 <= lb.id and lb.trainId not in (255, -1) and not lb.ignoreInEval]
    all_ids = [lb.id for lb in labels if lb.id >= 0]
    lut = np.full(256, IGNORE, dtype=np.int64)
    for lb in labels:
        if lb.id >= 0 and lb.trainId not in (255, -1) and not lb.ignoreInEval:
            lut[lb.id] = lb.trainId
    assert len(eval_ids) == 19

    rng = np.random.default_rng(0)
    gt_files, pred_files = [], []
    cm = ConfusionMatrix(19)
    city = tmp_path / "gtFine" / "val" / "testcity"
    city.mkdir(parents=True)
    pdir = tmp_path / "results"
    pdir.mkdir()
    # omit two evaluated classes from the ground truth (they are still predicted)
    gt_pool = [i for i in all_ids if i not in (eval_ids[4], eval_ids[11])]
    for k, (h, w) in enumerate([(12, 20), (9, 14), (16, 16)]):
        gt = rng.choice(gt_pool, size=(h, w)).astype(np.uint8)
        pred = rng.choice(eval_ids, size=(h, w)).astype(np.uint8)
        agree = rng.random((h, w)) < 0.5
        pred[agree & np.isin(gt, eval_ids)] = gt[agree & np.isin(gt, eval_ids)]
        name = f"testcity_000000_{k:06d}"
        gpath = city / f"{name}_gtFine_labelIds.png"
        ppath = pdir / f"{name}_pred.png"
        Image.fromarray(gt).save(gpath)
        Image.fromarray(pred).save(ppath)
        gt_files.append(str(gpath))
        pred_files.append(str(ppath))
        cm.update(torch.from_numpy(lut[np.array(Image.open(ppath))]), torch.from_numpy(lut[np.array(Image.open(gpath))]))

    monkeypatch.setattr(ev.args, "evalInstLevelScore", False)
    monkeypatch.setattr(ev.args, "JSONOutput", False)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "exportFile", str(tmp_path / "result.json"))
    result = ev.evaluateImgLists(pred_files, gt_files, ev.args)

    ours = cm.compute()
    id2name = {lb.trainId: lb.name for lb in labels if lb.trainId not in (255, -1) and not lb.ignoreInEval}
    theirs = np.array([result["classScores"][id2name[t]] for t in range(19)])
    np.testing.assert_allclose(ours["iou"], theirs, rtol=1e-12, equal_nan=True)
    assert ours["miou"] == pytest.approx(result["averageScoreClasses"], rel=1e-12)
    assert list(tmp_path.glob("**/*.json")) == []


# ----------------------------------------------------------------------------- CPU chunked / threaded path


def _loop_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    """Plain-loop reference with an arbitrary ignore index."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if 0 <= t < num_classes and t != ignore_index and 0 <= p < num_classes:
            m[t, p] += 1
    return m


def _mixed_labels(seed: int, num_classes: int, shape: tuple[int, ...], ignore_index: int):
    """Labels with ignored pixels, plus a few out-of-range ids confined to some regions so that
    some chunks take the fast path and others the fallback."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.1] = ignore_index
    pred = torch.where(torch.rand(shape, generator=g) < 0.7, target.clamp(0, num_classes - 1),
                       torch.randint(num_classes, shape, generator=g))
    flat_p, flat_t = pred.view(-1), target.view(-1)
    # one kind of bad id per 1000-pixel block (the chunk size the tests use), so that no other bad
    # id in the same chunk can hide a wrong bound check
    bad_pred = [num_classes, -1, num_classes + 1, 70000]
    bad_target = [-1, num_classes, 5000, 70000, -70000]
    for k, value in enumerate(bad_pred + bad_target):
        where = (flat_p if k < len(bad_pred) else flat_t)
        where[(1000 * k + 500) % where.numel()] = value
    return pred, target


@pytest.mark.parametrize("num_classes,ignore_index,dtype", [
    (19, 255, torch.int64), (19, 255, torch.int32), (19, 0, torch.int64), (19, -1, torch.int64),
    (16, 255, torch.int16), (150, 300, torch.int64),  # (300 + 1) * 150 bins: the int32 index path
])
@pytest.mark.parametrize("threads", [1, 3])
def test_chunked_threaded_cpu_counts_equal_plain_loop(monkeypatch, num_classes, ignore_index, dtype, threads):
    import study.metrics as metrics

    monkeypatch.setattr(metrics, "_CPU_CHUNK", 1000)  # ~11 chunks, some with out-of-range ids
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pred, target = _mixed_labels(num_classes + threads, num_classes, (3, 37, 101), ignore_index)
        pred, target = pred.to(dtype), target.to(dtype)  # the reference sees the same (wrapped) ids
        cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        cm.update(pred, target)
        cm.update(pred[1:2], target[1:2])  # a second update accumulates
    finally:
        torch.set_num_threads(previous)
    ref = _loop_confusion(pred, target, num_classes, ignore_index) + _loop_confusion(pred[1:2], target[1:2],
                                                                                     num_classes, ignore_index)
    assert cm.mat.dtype == torch.int64
    np.testing.assert_array_equal(cm.mat.numpy(), ref)


def test_uint8_and_non_contiguous_inputs():
    pred, target = _mixed_labels(3, 19, (2, 40, 60), 255)
    pred, target = pred.clamp(0, 255), target.clamp(0, 255)  # representable in uint8
    cm = ConfusionMatrix(19)
    cm.update(pred.to(torch.uint8).transpose(1, 2), target.to(torch.uint8).transpose(1, 2))
    ref = _loop_confusion(pred.transpose(1, 2), target.transpose(1, 2), 19, 255)
    np.testing.assert_array_equal(cm.mat.numpy(), ref)


@pytest.mark.parametrize("ignore_index", [255, 2, -1])
def test_device_path_equals_plain_loop_on_cpu_tensors(ignore_index):
    from study.metrics import _counts_device

    pred, target = _mixed_labels(11, 7, (2, 30, 50), ignore_index)
    counts = _counts_device(pred.reshape(-1), target.reshape(-1), 7, ignore_index)
    np.testing.assert_array_equal(counts.numpy(), _loop_confusion(pred, target, 7, ignore_index))

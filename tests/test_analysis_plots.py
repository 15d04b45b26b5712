"""analysis.plots: every figure is written as PNG and PDF, non-empty, byte-identical on re-runs,
without date/software metadata; published points drawn only for the paper's setting."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import plots as P
from analysis import tables as T

CLASSES = ["building", "road", "sky", "bicycle"]


def _summary(dataset: str, backbone: str) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [{"run_id": f"{l}{s}", "loss": l, "dataset": dataset, "backbone": backbone, "seed": s,
             "miou": rng.uniform(0.6, 0.8), "macc": rng.uniform(0.7, 0.9),
             "mprec": rng.uniform(0.7, 0.9)} for l in ("ce", "recall", "weighted_ce") for s in range(3)]
    return T.summary_table(pd.DataFrame(rows))


def _classes() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    return pd.DataFrame([{"run_id": f"{l}{s}", "loss": l, "dataset": "d", "backbone": "b", "seed": s,
                          "class": c, "iou": rng.uniform(), "recall": rng.uniform(),
                          "precision": rng.uniform()}
                         for l in ("ce", "weighted_ce", "recall", "focal") for s in range(2)
                         for c in CLASSES])


def _curves() -> pd.DataFrame:
    rows = []
    for l in ("ce", "recall"):
        for s in range(2):
            rid = f"{l}{s}"
            for step in (0, 5, 10):
                rows.append((rid, "train/loss", step, 2.0 / (1 + step) + s * 0.1))
                rows.append((rid, "val/miou", step, 0.3 + 0.02 * step + s * 0.01))
                if l == "recall":
                    for i, c in enumerate(CLASSES):
                        rows.append((rid, f"recall_weight/{c}", step, (i + 1) / (5 + step)))
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def _all_figures(out) -> list:
    ref = T.load_reference()
    conf = {l: np.random.default_rng(i).integers(0, 100, (4, 4)) for i, l in enumerate(("ce", "recall"))}
    curves = _curves()
    paths = []
    paths += P.plot_miou_macc(_summary("synthia", "paper_resnet18"), out / "scatter_paper", ref)
    paths += P.plot_miou_macc(_summary("texdigits", "r18"), out / "scatter_demo", ref)
    paths += P.plot_recall_weights(curves, CLASSES, out / "weights",
                                   class_frequency={"building": 35, "road": 25, "sky": 11})
    paths += P.plot_per_class_bars(_classes(), CLASSES, out / "bars")
    paths += P.plot_confusions(conf, CLASSES, out / "confusion", title="t")
    paths += P.plot_training_curves(curves, {f"{l}{s}": l for l in ("ce", "recall") for s in range(2)},
                                    out / "curves")
    return paths


def test_every_figure_png_and_pdf_deterministic(tmp_path):
    a = _all_figures(tmp_path / "a")
    b = _all_figures(tmp_path / "b")
    assert len(a) == 12
    for pa, pb in zip(a, b):
        data = pa.read_bytes()
        assert len(data) > 2000, pa
        if pa.suffix == ".png":
            assert data.startswith(b"\x89PNG")
            with Image.open(pa) as im:
                assert im.size[0] > 300 and im.size[1] > 200
                assert "Software" not in im.info
        else:
            assert pa.suffix == ".pdf" and data.startswith(b"%PDF")
            assert b"CreationDate" not in data and b"ModDate" not in data
        assert data == pb.read_bytes(), f"{pa.name} differs between two runs"


def test_published_points_only_for_paper_setting(tmp_path):
    ref = T.load_reference()
    paper = _summary("synthia", "paper_resnet18")
    with_ref = P.plot_miou_macc(paper, tmp_path / "p1", ref)[0].read_bytes()
    without = P.plot_miou_macc(paper, tmp_path / "p2", None)[0].read_bytes()
    assert with_ref != without  # hollow published markers + legend entry drawn
    demo = _summary("texdigits", "r18")
    d1 = P.plot_miou_macc(demo, tmp_path / "d1", ref)[0].read_bytes()
    d2 = P.plot_miou_macc(demo, tmp_path / "d2", None)[0].read_bytes()
    assert d1 == d2  # setting differs: the reference is not drawn
    with pytest.raises(ValueError, match="one dataset/backbone"):
        P.plot_miou_macc(pd.concat([paper, demo]), tmp_path / "x", ref)


def test_row_normalise_and_input_checks(tmp_path):
    m = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    r = P.row_normalise(m)
    np.testing.assert_allclose(r[0], [0.75, 0.25, 0.0])
    assert np.isnan(r[1]).all()
    np.testing.assert_allclose(r[2], [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="shape"):
        P.plot_confusions({"ce": np.ones((3, 3))}, CLASSES, tmp_path / "bad")
    with pytest.raises(ValueError, match="recall_weight"):
        P.plot_recall_weights(_curves()[lambda d: d.key == "train/loss"], CLASSES, tmp_path / "w")
    with pytest.raises(ValueError, match="none of the losses"):
        P.plot_per_class_bars(_classes(), CLASSES, tmp_path / "b", losses=("ohem",))


def test_loss_colours_are_stable():
    a = P.loss_colors(["recall", "ce"])
    b = P.loss_colors(["ce", "weighted_ce", "recall", "my_loss"])
    assert a["ce"] == b["ce"] and a["recall"] == b["recall"]
    assert len(set(b.values())) == 4

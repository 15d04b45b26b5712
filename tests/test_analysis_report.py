"""analysis.report.write_report on a real sqlite MLflow store: files, README content, determinism."""
from __future__ import annotations

import os
import re
import time

import pandas as pd
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

try:
    from test_analysis_collect import CLASSES, FREQUENCY, log_grid, new_store
except ImportError:  # tests/ imported as a package
    from tests.test_analysis_collect import CLASSES, FREQUENCY, log_grid, new_store

from analysis import tables as T  # noqa: E402
from analysis.report import write_report  # noqa: E402

LOSSES = ["ce", "weighted_ce", "class_balanced", "recall"]
FIGURES = ("miou_macc", "recall_weights", "per_class_bars", "confusion", "training_curves")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    uri, client, exp = new_store(tmp)
    demo = log_grid(client, exp, "demo", "texdigits", "r18", LOSSES, [0, 1, 2], tmp)
    paper = log_grid(client, exp, "paper", "synthia", "paper_resnet18", ["ce", "recall"], [0, 1],
                     tmp, failed=False)
    return uri, demo, paper, tmp


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_report_files_readme_and_determinism(store, tmp_path):
    uri, demo, _, _ = store
    t0 = time.perf_counter()
    readme = write_report(uri, tmp_path / "a", grid="demo", experiment_names=["study"])
    elapsed = time.perf_counter() - t0
    write_report(uri, tmp_path / "b", grid="demo", experiment_names=["study"])
    print(f"\nwrite_report (12 runs, 5 figures, 6 tables): {elapsed:.2f} s")
    a, b = tmp_path / "a", tmp_path / "b"
    assert readme == a / "README.md"
    files = _files(a)
    assert files == _files(b)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between runs"
        assert (a / rel).stat().st_size > 0, rel
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (a / "figures" / f"{name}.{ext}").stat().st_size > 2000
    for name in ("summary", "claims", "published_comparison", "per_class_iou",
                 "per_class_recall", "per_class_precision"):
        for ext in ("md", "tex", "csv"):
            assert (a / "tables" / f"{name}.{ext}").exists()

    text = readme.read_text()
    assert text.startswith("# Results: grid `demo`")
    assert "- Runs: 12 finished runs (4 losses)" in text
    assert "- Seeds: 0, 1, 2." in text and "texdigits" in text
    assert str(tmp_path) not in text and "sqlite" not in text
    # every link is relative and resolves
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all(not os.path.isabs(l) and (a / l).is_file() for l in links)
    for name in FIGURES:
        assert f"![" in text and f"(figures/{name}.png)" in text
    # the claims table is inline, with the verdicts of the synthetic grid
    claims = pd.read_csv(a / "tables" / "claims.csv")
    assert len(claims) == len(T.CLAIMS)
    assert claims.set_index("comparison").loc["weighted_ce vs ce", "verdict"] == "held"
    for verdict in claims["verdict"]:
        assert f"| {verdict} |" in text
    assert "Nothing compared" in text  # demo grid is not the paper's setting
    # per-class tables are ordered by the pixel counts of the per-class artifact
    iou = pd.read_csv(a / "tables" / "per_class_iou.csv")
    assert list(iou.columns[1:]) == sorted(CLASSES, key=lambda c: -FREQUENCY[c])
    summary = pd.read_csv(a / "tables" / "summary.csv")
    assert summary["loss"].tolist() == LOSSES and (summary["n"] == 3).all()


def test_report_paper_setting_compares_published_numbers(store, tmp_path):
    uri, _, paper, _ = store
    write_report(uri, tmp_path / "p", parent_run_id=paper.parent_run_id)
    pub = pd.read_csv(tmp_path / "p" / "tables" / "published_comparison.csv")
    ref = {r["loss"]: r for r in T.load_reference()["figure1"]}
    summary = pd.read_csv(tmp_path / "p" / "tables" / "summary.csv").set_index("loss")
    rows = pub.set_index("loss")
    assert set(rows.index) == set(ref)
    for loss in ("ce", "recall"):
        assert rows.at[loss, "n"] == 2
        assert rows.at[loss, "miou_diff"] == pytest.approx(
            summary.at[loss, "miou"] - ref[loss]["miou"], abs=1e-4)
    text = (tmp_path / "p" / "README.md").read_text()
    assert "Nothing compared" not in text and "| recall | 81.40 |" in text
    # SYNTHIA: classes the paper lists are ordered by its Figure 1 training frequencies
    assert "Figure 1" in text
    # recall-family curves and all figures exist
    assert (tmp_path / "p" / "figures" / "recall_weights.png").stat().st_size > 2000


def test_report_without_runs_raises(store, tmp_path):
    uri, _, _, _ = store
    with pytest.raises(ValueError, match="no finished runs match grid='nope'"):
        write_report(uri, tmp_path / "x", grid="nope")

"""analysis.tables on hand-built run tables: statistics against scipy/statistics, claim verdicts on
constructed cases, the published comparison, and the written Markdown/LaTeX/CSV files."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import tables as T


def make_runs(values: dict[tuple[str, int], tuple[float, float, float]],
              dataset: str = "texdigits", backbone: str = "r18") -> pd.DataFrame:
    """values: (loss, seed) -> (miou, macc, mprec) as fractions."""
    rows = [{"run_id": f"{dataset}-{backbone}-{loss}-{seed}", "loss": loss, "dataset": dataset,
             "backbone": backbone, "seed": seed, "miou": v[0], "macc": v[1], "mprec": v[2]}
            for (loss, seed), v in values.items()]
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    return df


@pytest.fixture
def random_runs():
    rng = np.random.default_rng(7)
    values = {}
    for loss, n in (("ce", 4), ("recall", 3), ("focal", 1), ("weighted_ce", 5)):
        for s in range(n):
            values[(loss, s)] = tuple(rng.uniform(0.3, 0.9, size=3))
    other = {(loss, s): tuple(rng.uniform(0.3, 0.9, size=3)) for loss in ("ce", "recall")
             for s in range(2)}
    return values, pd.concat([make_runs(values), make_runs(other, "synthia", "paper_resnet18")],
                             ignore_index=True), other


def test_summary_matches_hand_computation(random_runs):
    values, runs, other = random_runs
    summary = T.summary_table(runs)
    assert list(summary[["dataset", "loss"]].itertuples(index=False, name=None)) == [
        ("synthia", "ce"), ("synthia", "recall"), ("texdigits", "ce"), ("texdigits", "weighted_ce"),
        ("texdigits", "focal"), ("texdigits", "recall")]
    for j, m in enumerate(T.METRICS):
        ce = [100 * v[j] for (loss, _), v in values.items() if loss == "ce"]
        for loss in ("ce", "recall", "focal", "weighted_ce"):
            xs = [100 * v[j] for (l, _), v in values.items() if l == loss]
            row = summary[(summary["loss"] == loss) & (summary["dataset"] == "texdigits")].iloc[0]
            assert row["n"] == len(xs)
            assert row[m] == pytest.approx(statistics.fmean(xs), rel=1e-12)
            assert row[f"{m}_rel_ce"] == pytest.approx(
                100 * (statistics.fmean(xs) - statistics.fmean(ce)) / statistics.fmean(ce), rel=1e-9)
            if len(xs) == 1:
                assert math.isnan(row[f"{m}_std"]) and math.isnan(row[f"{m}_ci95"])
                continue
            sd = statistics.stdev(xs)
            lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=statistics.fmean(xs),
                                      scale=stats.sem(xs))
            assert row[f"{m}_std"] == pytest.approx(sd, rel=1e-9)
            assert row[f"{m}_ci95"] == pytest.approx((hi - lo) / 2, rel=1e-9)
    # CE row: 0 % relative change; relative change is computed within the same dataset/backbone
    assert (summary[summary["loss"] == "ce"]["miou_rel_ce"] == 0).all()
    syn = summary[(summary["dataset"] == "synthia") & (summary["loss"] == "recall")].iloc[0]
    ce_syn = statistics.fmean(100 * v[0] for (l, _), v in other.items() if l == "ce")
    rc_syn = statistics.fmean(100 * v[0] for (l, _), v in other.items() if l == "recall")
    assert syn["miou_rel_ce"] == pytest.approx(100 * (rc_syn - ce_syn) / ce_syn)


def test_summary_without_ce_has_nan_relative_change():
    runs = make_runs({("recall", 0): (0.5, 0.6, 0.7), ("recall", 1): (0.6, 0.7, 0.8)})
    s = T.summary_table(runs)
    assert s["miou_rel_ce"].isna().all()
    assert T.summary_table(runs.iloc[0:0]).empty


def make_classes(entries: dict[tuple[str, int, str], tuple[float, float, float]],
                 dataset: str = "texdigits", backbone: str = "r18") -> pd.DataFrame:
    return pd.DataFrame([{"run_id": f"{loss}-{s}", "loss": loss, "dataset": dataset,
                          "backbone": backbone, "seed": s, "class": c, "split": "test",
                          "iou": v[0], "recall": v[1], "precision": v[2]}
                         for (loss, s, c), v in entries.items()])


def test_per_class_table_values_and_order():
    rng = np.random.default_rng(3)
    names = ["void", "sky", "building", "bicycle"]  # logged order
    entries = {(loss, s, c): tuple(rng.uniform(0, 1, 3))
               for loss in ("recall", "ce", "weighted_ce") for s in range(3) for c in names}
    classes = make_classes(entries)
    for k, metric in enumerate(("iou", "recall", "precision")):
        t = T.per_class_table(classes, metric)
        assert t["loss"].tolist() == ["ce", "weighted_ce", "recall"]
        assert list(t.columns[1:]) == names
        for loss in ("ce", "weighted_ce", "recall"):
            for c in names:
                want = 100 * sum(entries[(loss, s, c)][k] for s in range(3)) / 3
                got = t[t["loss"] == loss][c].iloc[0]
                assert got == pytest.approx(want, rel=1e-12)
    freq = {"building": 35, "sky": 11, "void": 2, "bicycle": 0.002}
    t = T.per_class_table(classes, "iou", class_frequency=freq)
    assert list(t.columns[1:]) == ["building", "sky", "void", "bicycle"]
    both = pd.concat([classes, make_classes(entries, "synthia", "paper_resnet18")])
    with pytest.raises(ValueError, match="dataset= and backbone="):
        T.per_class_table(both, "iou")
    assert len(T.per_class_table(both, "iou", dataset="synthia")) == 3
    with pytest.raises(ValueError, match="metric"):
        T.per_class_table(classes, "f1")


def test_published_comparison_only_for_paper_setting(random_runs):
    _, runs, _ = random_runs
    ref = T.load_reference()
    summary = T.summary_table(runs)
    pub = T.published_comparison(summary, ref)
    fig = {r["loss"]: r for r in ref["figure1"]}
    assert set(pub["loss"]) == set(fig)  # paper's losses; ours only ce and recall
    ours = summary[summary["dataset"] == "synthia"].set_index("loss")
    for r in pub.itertuples(index=False):
        assert r.miou_published == fig[r.loss]["miou"] and r.macc_published == fig[r.loss]["macc"]
        if r.loss in ours.index:
            assert r.miou_repro == pytest.approx(ours.at[r.loss, "miou"])
            assert r.macc_diff == pytest.approx(ours.at[r.loss, "macc"] - fig[r.loss]["macc"])
            assert r.n == 2
        else:
            assert math.isnan(r.miou_repro) and r.n == 0
    assert "Figure 1" in pub.attrs["note"]
    demo = T.published_comparison(summary[summary["dataset"] == "texdigits"], ref)
    assert demo.empty
    assert "Nothing compared" in demo.attrs["note"] and "texdigits/r18" in demo.attrs["note"]


def _claims_case(recall_macc_shift, recall_miou_shift, wce_prec_shift, seeds=(0, 1, 2, 3),
                 noise=0.004, drop=()):
    rng = np.random.default_rng(11)
    vals = {}
    for s in seeds:
        base = np.array([0.6, 0.7, 0.75]) + rng.uniform(-0.02, 0.02, 3)
        vals[("ce", s)] = tuple(base)
        vals[("recall", s)] = tuple(base + np.array([recall_miou_shift, recall_macc_shift, 0.0])
                                    + rng.uniform(-noise, noise, 3))
        vals[("weighted_ce", s)] = tuple(base + np.array([0.0, 0.0, wce_prec_shift])
                                         + rng.uniform(-noise, noise, 3))
    vals = {k: v for k, v in vals.items() if k[0] not in drop}
    return make_runs(vals)


def _row(claims, claim_id, comparison):
    r = claims[(claims["claim_id"] == claim_id) & (claims["comparison"] == comparison)]
    assert len(r) == 1
    return r.iloc[0]


def test_claims_held():
    runs = _claims_case(+0.06, -0.005, -0.08)
    c = T.claims_table(runs)
    assert list(c.columns[:6]) == ["claim_id", "claim", "setting", "comparison", "metric", "verdict"]
    r1 = _row(c, 1, "recall vs ce")
    assert r1["verdict"] == "held" and r1["n_pairs"] == 4
    ce = runs[runs.loss == "ce"].sort_values("seed")
    rc = runs[runs.loss == "recall"].sort_values("seed")
    p = stats.ttest_rel(100 * rc["macc"].to_numpy(), 100 * ce["macc"].to_numpy(),
                        alternative="greater").pvalue
    assert r1["p_value"] == pytest.approx(p, rel=1e-9)
    d = 100 * (rc["macc"].to_numpy() - ce["macc"].to_numpy())
    assert r1["diff"] == pytest.approx(d.mean())
    assert r1["rel_change"] == pytest.approx(100 * d.mean() / (100 * ce["macc"].mean()))
    assert "+8.8 %" in r1["published"]
    r2 = _row(c, 2, "recall vs ce")
    p2 = stats.ttest_rel(100 * rc["miou"].to_numpy() + T.MIOU_MARGIN, 100 * ce["miou"].to_numpy(),
                         alternative="greater").pvalue
    assert r2["verdict"] == "held" and r2["p_value"] == pytest.approx(p2, rel=1e-9)
    r3 = _row(c, 3, "weighted_ce vs ce")
    assert r3["verdict"] == "held" and r3["diff"] < 0
    # class_balanced has no runs here
    r3b = _row(c, 3, "class_balanced vs ce")
    assert r3b["verdict"] == "not testable" and "class_balanced" in r3b["note"]
    assert math.isnan(r3b["p_value"])


def test_claims_not_held():
    c = T.claims_table(_claims_case(-0.03, -0.05, +0.03))
    assert _row(c, 1, "recall vs ce")["verdict"] == "not held"
    r2 = _row(c, 2, "recall vs ce")
    assert r2["verdict"] == "not held" and r2["diff"] == pytest.approx(-5, abs=1)
    assert _row(c, 3, "weighted_ce vs ce")["verdict"] == "not held"
    # an improvement too small and noisy to be significant is "not held" as well
    c = T.claims_table(_claims_case(+0.001, 0.0, 0.0, noise=0.03))
    r1 = _row(c, 1, "recall vs ce")
    assert r1["verdict"] == "not held" and r1["p_value"] >= T.ALPHA


def test_claims_not_testable():
    c = T.claims_table(_claims_case(+0.06, 0.0, -0.08, seeds=(0,)))
    for cid, comp in ((1, "recall vs ce"), (2, "recall vs ce"), (3, "weighted_ce vs ce")):
        r = _row(c, cid, comp)
        assert r["verdict"] == "not testable" and r["n_pairs"] == 1 and "needs >= 2" in r["note"]
    c = T.claims_table(_claims_case(+0.06, 0.0, -0.08, drop=("ce",)))
    assert (c["verdict"] == "not testable").all()
    assert "no finished ce runs" in _row(c, 1, "recall vs ce")["note"]
    empty = T.claims_table(_claims_case(0, 0, 0).iloc[0:0])
    assert (empty["verdict"] == "not testable").all() and len(empty) == len(T.CLAIMS)


def test_claims_pair_by_seed_only():
    runs = _claims_case(+0.06, 0.0, -0.08, seeds=(0, 1, 2, 3, 4))
    runs = runs[~((runs.loss == "ce") & (runs.seed == 4)) & ~((runs.loss == "recall") & (runs.seed == 0))]
    r1 = _row(T.claims_table(runs), 1, "recall vs ce")
    assert r1["n_pairs"] == 3
    ce = runs[(runs.loss == "ce") & runs.seed.isin([1, 2, 3])].sort_values("seed")["macc"].to_numpy()
    rc = runs[(runs.loss == "recall") & runs.seed.isin([1, 2, 3])].sort_values("seed")["macc"].to_numpy()
    assert r1["diff"] == pytest.approx(100 * (rc - ce).mean())
    assert r1["ce_mean"] == pytest.approx(100 * ce.mean())


def test_paired_p_degenerate_cases():
    assert T.paired_one_sided_p(np.array([1.0, 1.0, 1.0]), "greater") == 0.0
    assert T.paired_one_sided_p(np.array([1.0, 1.0]), "less") == 1.0
    assert T.paired_one_sided_p(np.zeros(3), "greater") == 1.0
    d = np.array([0.5, 1.5, -0.2, 0.9])
    assert T.paired_one_sided_p(d, "greater") == pytest.approx(
        stats.ttest_1samp(d, 0, alternative="greater").pvalue)


def test_write_tables_formats_and_determinism(tmp_path, random_runs):
    _, runs, _ = random_runs
    summary = T.summary_table(runs)
    demo = T.published_comparison(summary[summary["dataset"] == "texdigits"])
    tabs = {"summary": summary, "claims": T.claims_table(runs), "published_comparison": demo}
    a = T.write_tables(tabs, tmp_path / "a")
    b = T.write_tables(tabs, tmp_path / "b")
    for name, paths in a.items():
        for kind, p in paths.items():
            assert p.read_bytes() == b[name][kind].read_bytes(), p
    md = a["summary"]["md"].read_text().splitlines()
    assert md[0].startswith("| loss | dataset | backbone | n | mIoU |")
    assert set(md[1].replace("|", "").split()) <= {":---", "---:"}
    assert len(md) == 2 + len(summary)
    ce = summary[(summary.loss == "ce") & (summary.dataset == "texdigits")].iloc[0]
    assert f"| {ce['miou']:.2f} |" in a["summary"]["md"].read_text()
    focal = [line for line in md if line.startswith("| focal |")][0]
    assert "| - |" in focal  # n = 1: sd and CI shown as "-"
    tex = a["summary"]["tex"].read_text()
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"weighted\_ce"):
        assert cmd in tex
    assert tex.count(r"\\") == 1 + len(summary)
    back = pd.read_csv(a["summary"]["csv"])
    assert back["miou"].to_numpy() == pytest.approx(summary["miou"].to_numpy(), rel=1e-5)
    assert "Nothing compared" in a["published_comparison"]["md"].read_text()
    assert "% Nothing compared" in a["published_comparison"]["tex"].read_text()

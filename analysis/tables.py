"""Tables of a study: summary over seeds, per-class, published comparison, paper claims.

All metric values in the tables are percentages (MLflow holds fractions; see ``analysis.collect``).

- ``summary_table``: per loss x dataset x backbone, for mIoU/mAcc/mPrec the mean, the std
  (ddof = 1), the 95 % CI half-width ``t_{0.975, n-1} * std / sqrt(n)`` (NaN for n = 1), the number
  of seeds n, and the relative change of the mean against ``ce`` on the same dataset and backbone,
  ``100 * (mean - mean_ce) / mean_ce``.
- ``per_class_table``: rows = losses, columns = classes, mean over seeds.
- ``published_comparison``: the paper's Figure 1 numbers beside the reproduction.
- ``claims_table``: the paper's claims tested with paired (by seed) one-sided t-tests.
- ``write_tables``: Markdown, LaTeX (booktabs) and CSV with fixed float formatting.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import yaml
from scipy import stats

METRICS: tuple[str, ...] = ("miou", "macc", "mprec")
LABELS: dict[str, str] = {"miou": "mIoU", "macc": "mAcc", "mprec": "mPrec"}
LOSS_ORDER: tuple[str, ...] = (
    "ce", "weighted_ce", "class_balanced", "focal", "ohem", "lovasz", "soft_iou", "recall",
)
BASELINE = "ce"
WEIGHTED_LOSSES: tuple[str, ...] = ("weighted_ce", "class_balanced")
RECALL_LOSS = "recall"
PAPER_SETTING: dict[str, str] = {"dataset": "synthia", "backbone": "paper_resnet18"}
ALPHA = 0.05            # one-sided significance level of every claim test
MIOU_MARGIN = 2.0       # claim 2: largest tolerated mIoU drop against CE, in points
REFERENCE_PATH = Path(__file__).parent / "reference" / "recall_loss_paper.yaml"


def load_reference(path: str | Path = REFERENCE_PATH) -> dict:
    """The published numbers (``analysis/reference/recall_loss_paper.yaml``)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def loss_sort_key(loss: str) -> tuple[int, str]:
    """Paper order for known losses, then the others alphabetically."""
    return (LOSS_ORDER.index(loss), "") if loss in LOSS_ORDER else (len(LOSS_ORDER), str(loss))


def _sort_losses(df: pd.DataFrame, *first: str) -> pd.DataFrame:
    key = df["loss"].map(loss_sort_key)
    df = df.assign(_k=key).sort_values([*first, "_k"], kind="mergesort")
    return df.drop(columns="_k").reset_index(drop=True)


def ci95_halfwidth(std: float, n: int) -> float:
    """Student-t 95 % CI half-width of a mean: t.ppf(0.975, n-1) * std / sqrt(n); NaN for n < 2."""
    if n < 2 or not np.isfinite(std):
        return float("nan")
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


SHOWN_ELSEWHERE = ("seed", "loss", "loss.name", "data.name", "model.backbone")


def annotate_design(runs: pd.DataFrame, design: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Add the grid's design to the runs: ``axes`` (dict), ``context``, ``role`` and a unique ``loss`` label.

    ``design`` maps spec hash -> {"axes": {dotted path: value}, "role": "recall" | "ce" | None} (from
    the grid file); runs it does not cover use their ``study.axes`` tag and the default roles (the
    plain ``recall`` and ``ce`` labels). ``context`` = the axes other than seed, loss, data set and
    backbone ("" when none), so rows of one table differ only in what the grid varied. Two groups
    (runs equal but for the seed, ``group``) never share a row: a label shared by several groups in
    one context gets the group's id appended.
    """
    design = design or {}
    out = runs.copy()
    if "spec_hash" not in out.columns:
        out["spec_hash"] = out["run_id"] if "run_id" in out.columns else range(len(out))
    if "axes" not in out.columns:
        out["axes"] = "{}"
    if "group" not in out.columns:
        out["group"] = out["loss"].astype(str) + "|" + out["dataset"].astype(str) + "|" + out["backbone"].astype(str)
    if "loss_name" not in out.columns:
        out["loss_name"] = out["loss"]
    axes = [design[h]["axes"] if h in design else (a if isinstance(a, dict) else json.loads(a or "{}"))
            for h, a in zip(out["spec_hash"], out["axes"])]
    out["axes"] = axes
    out["context"] = [", ".join(f"{k}={v}" for k, v in sorted(a.items()) if k not in SHOWN_ELSEWHERE) for a in axes]
    default_role = {"recall": "recall", BASELINE: "ce"}
    out["role"] = [design[h].get("role") if h in design else default_role.get(loss)
                   for h, loss in zip(out["spec_hash"], out["loss"])]
    if not out.empty:
        key = ["dataset", "backbone", "context", "loss"]
        clash = out.groupby(key, dropna=False)["group"].transform("nunique") > 1
        out.loc[clash, "loss"] = out.loc[clash, "loss"] + " #" + out.loc[clash, "group"].str[:6]
    return out


def _context_columns(runs: pd.DataFrame) -> list[str]:
    """The varied axes to show as columns (dotted paths other than seed, loss, data set, backbone)."""
    if "axes" not in runs.columns:
        return []
    keys = {k for a in runs["axes"] for k in (a if isinstance(a, dict) else {}) if k not in SHOWN_ELSEWHERE}
    return sorted(keys)


def _group_row(g: pd.DataFrame, axis_cols: list[str]) -> dict:
    """One summary row: per metric mean/std/ci95 over seeds (each seed averaged first), in %."""
    first = g.iloc[0]
    row: dict = {"loss": first["loss"], "dataset": first["dataset"], "backbone": first["backbone"]}
    for col in axis_cols:
        row[col] = first["axes"].get(col) if isinstance(first["axes"], dict) else None
    per_seed = g.groupby("seed")[list(METRICS)].mean()
    row["n"] = int(len(per_seed))
    for m in METRICS:
        v = 100.0 * per_seed[m].astype(float).dropna().to_numpy()
        n = len(v)
        mean = float(v.mean()) if n else float("nan")
        std = float(v.std(ddof=1)) if n > 1 else float("nan")
        row.update({m: mean, f"{m}_std": std, f"{m}_ci95": ci95_halfwidth(std, n)})
    return row


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per combination of the grid's axes other than seed (never pooling runs whose resolved
    settings differ in anything but the seed): n seeds and, per metric, mean/std/ci95/rel_ce in %.

    ``rel_ce`` compares with the CE row (role ``ce``) of the same data set, backbone and context.
    """
    if "context" not in runs.columns:
        runs = annotate_design(runs)
    axis_cols = _context_columns(runs)
    cols = ["loss", "dataset", "backbone", *axis_cols, "n"]
    for m in METRICS:
        cols += [m, f"{m}_std", f"{m}_ci95", f"{m}_rel_ce"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    rows, roles, contexts = [], [], []
    for _, g in runs.groupby(["dataset", "backbone", "context", "loss"], sort=True, dropna=False):
        rows.append(_group_row(g, axis_cols))
        roles.append(g["role"].iloc[0])
        contexts.append(g["context"].iloc[0])
    out = pd.DataFrame(rows)
    out.attrs["loss_names"] = dict(zip(runs["loss"], runs["loss_name"])) if "loss_name" in runs else {}
    out.attrs["roles"] = dict(zip(runs["loss"], runs["role"]))
    base_rows = {(r["dataset"], r["backbone"], c): r for r, role, c in zip(rows, roles, contexts) if role == "ce"}
    for m in METRICS:
        ref = pd.Series([base_rows.get((r["dataset"], r["backbone"], c), {}).get(m, np.nan)
                         for r, c in zip(rows, contexts)], index=out.index, dtype=float)
        out[f"{m}_rel_ce"] = 100.0 * (out[m] - ref) / ref
    attrs = dict(out.attrs)
    out = _sort_losses(out[cols], "dataset", "backbone", *axis_cols)
    out.attrs.update(attrs)
    return out


def per_class_table(classes: pd.DataFrame, metric: str,
                    class_frequency: Mapping[str, float] | None = None,
                    dataset: str | None = None, backbone: str | None = None) -> pd.DataFrame:
    """Rows = losses (column ``loss``), columns = classes: mean over seeds of ``metric`` in %.

    Classes are ordered by decreasing ``class_frequency`` (training pixel share) when given (classes
    it lacks go last), else in the order the trainer logged them. The table covers one dataset and
    backbone: pass ``dataset``/``backbone`` when ``classes`` holds several.
    """
    if metric not in ("iou", "recall", "precision"):
        raise ValueError(f"metric: {metric!r} is not one of ['iou', 'recall', 'precision']")
    df = classes
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if backbone is not None:
        df = df[df["backbone"] == backbone]
    settings = sorted(set(zip(df["dataset"], df["backbone"])))
    if len(settings) > 1:
        raise ValueError(f"per_class_table: classes hold several dataset/backbone settings "
                         f"{settings}; pass dataset= and backbone=")
    names = list(dict.fromkeys(df["class"]))
    if class_frequency is not None:
        names.sort(key=lambda c: -float(class_frequency.get(c, -np.inf)))  # stable for ties
    if df.empty:
        return pd.DataFrame(columns=["loss", *names])
    table = (100.0 * df.groupby(["loss", "class"], sort=False)[metric].mean()).unstack("class")
    table = table.reindex(columns=names).reset_index()
    table.columns.name = None
    return _sort_losses(table)


def _setting_rows(summary: pd.DataFrame, dataset: str, backbone: str) -> pd.DataFrame:
    return summary[(summary["dataset"] == dataset) & (summary["backbone"] == backbone)]


def published_comparison(summary: pd.DataFrame, reference: Mapping | None = None) -> pd.DataFrame:
    """Figure 1 (mIoU, mAcc) beside the reproduction; ``diff = reproduction - published`` in points.

    Only rows of the paper's setting (dataset ``synthia``, backbone ``paper_resnet18``) are
    compared. Otherwise the table is empty. ``.attrs["note"]`` always says what was compared.
    """
    reference = load_reference() if reference is None else reference
    cols = ["loss", "miou_published", "miou_repro", "miou_diff",
            "macc_published", "macc_repro", "macc_diff", "n"]
    ds, bb = PAPER_SETTING["dataset"], PAPER_SETTING["backbone"]
    ours = _setting_rows(summary, ds, bb)
    if ours.empty:
        present = sorted(set(zip(summary["dataset"], summary["backbone"])))
        shown = ", ".join(f"{d}/{b}" for d, b in present) or "no runs"
        out = pd.DataFrame(columns=cols)
        out.attrs["note"] = (
            f"Nothing compared: the paper's Figure 1 is {reference.get('dataset')} with "
            f"{reference.get('backbone')} (here dataset `{ds}`, backbone `{bb}`); "
            f"this grid has {shown}.")
        return out
    published = {r["loss"]: r for r in reference["figure1"]}
    ours = ours.set_index("loss")
    names, roles = summary.attrs.get("loss_names", {}), summary.attrs.get("roles", {})

    def published_name(label: str) -> str | None:
        """The Figure 1 loss a row reproduces: by component name; for recall only the declared variant."""
        name = names.get(label, label)
        if name == RECALL_LOSS and roles.get(label) != "recall":
            return None
        return name

    covered = {published_name(label) for label in ours.index}
    losses = sorted(set(ours.index) | (set(published) - covered), key=loss_sort_key)
    rows = []
    for loss in losses:
        row: dict = {"loss": loss}
        base = published_name(loss) if loss in ours.index else loss
        for m in ("miou", "macc"):
            pub = float(published[base][m]) if base in published else float("nan")
            rep = float(ours.at[loss, m]) if loss in ours.index else float("nan")
            row.update({f"{m}_published": pub, f"{m}_repro": rep, f"{m}_diff": rep - pub})
        row["n"] = int(ours.at[loss, "n"]) if loss in ours.index else 0
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    out.attrs["note"] = (f"Published values: {reference.get('source')}, read to about "
                         f"+/-0.15 points; diff = reproduction - published, in points.")
    return out


def figure1_pairs(summary: pd.DataFrame, reference: Mapping | None = None) -> pd.DataFrame:
    """Rows of ``summary`` matched to Figure 1's losses (by component name; recall = the declared role),
    one per (dataset, backbone, loss): columns setting, loss, figure1 loss, miou/macc published and repro."""
    reference = load_reference() if reference is None else reference
    published = {r["loss"]: r for r in reference.get("figure1", [])}
    names, roles = summary.attrs.get("loss_names", {}), summary.attrs.get("roles", {})
    rows = []
    for r in summary.itertuples(index=False):
        name = names.get(r.loss, r.loss)
        if name not in published or (name == RECALL_LOSS and roles.get(r.loss, "recall") != "recall"):
            continue
        rows.append({"setting": f"{r.dataset}/{r.backbone}", "loss": r.loss, "figure1": name,
                     "miou_published": float(published[name]["miou"]), "miou_repro": float(r.miou),
                     "macc_published": float(published[name]["macc"]), "macc_repro": float(r.macc)})
    cols = ["setting", "loss", "figure1", "miou_published", "miou_repro", "macc_published", "macc_repro"]
    return pd.DataFrame(rows, columns=cols)


def ordering_agreement(summary: pd.DataFrame, reference: Mapping | None = None) -> pd.DataFrame:
    """Kendall's tau-b between Figure 1's order of the losses and this grid's, per setting and metric.

    tau = (concordant - discordant pairs) / sqrt((n0 - ties_x)(n0 - ties_y)) over the losses present in
    both (scipy.stats.kendalltau, exact two-sided p-value for small n without ties). A setting with
    fewer than 3 matched losses (or two matches of one Figure 1 loss) is not scored.
    """
    pairs = figure1_pairs(summary, reference)
    rows = []
    for setting, g in pairs.groupby("setting", sort=True):
        for m in ("miou", "macc"):
            row = {"setting": setting, "metric": LABELS[m], "n_losses": len(g), "tau": np.nan,
                   "p_value": np.nan, "note": ""}
            if len(g) < 3 or g["figure1"].duplicated().any():
                row["note"] = ("fewer than 3 Figure 1 losses" if len(g) < 3
                               else "a Figure 1 loss has several variants here")
            else:
                res = stats.kendalltau(g[f"{m}_published"], g[f"{m}_repro"])
                row.update(tau=float(res.statistic), p_value=float(res.pvalue),
                           note="two-sided test of tau = 0")
            rows.append(row)
    return pd.DataFrame(rows, columns=["setting", "metric", "n_losses", "tau", "p_value", "note"])


def _paired(a_runs: pd.DataFrame, b_runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    a = a_runs.groupby("seed")[metric].mean()
    b = b_runs.groupby("seed")[metric].mean()
    pairs = pd.concat({"loss": a, "base": b}, axis=1, join="inner").dropna()
    return 100.0 * pairs.sort_index()


def _side(sub: pd.DataFrame, claim: dict) -> pd.DataFrame:
    """The runs of a claim's loss in one setting: the declared recall variant (role) or a weighted loss
    with its default parameters."""
    if claim["loss"] == RECALL_LOSS:
        return sub[sub["role"] == "recall"]
    return sub[sub["loss"] == claim["loss"]]


def paired_one_sided_p(diff: np.ndarray, alternative: str, shift: float = 0.0) -> float:
    """One-sided one-sample t-test of mean(diff + shift) vs 0 (= paired t-test of the pairs).

    ``alternative`` is "greater" or "less". When all differences are equal (zero variance) the test
    is degenerate: p = 0 if they all lie on the alternative's side, 1 otherwise.
    """
    d = np.asarray(diff, dtype=float) + shift
    if np.ptp(d) == 0.0:
        on_side = d[0] > 0 if alternative == "greater" else d[0] < 0
        return 0.0 if on_side else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_1samp(d, 0.0, alternative=alternative).pvalue)


CLAIMS: tuple[dict, ...] = (
    {"id": 1, "claim": "recall loss raises mAcc over CE (~9 % relative)", "loss": RECALL_LOSS,
     "metric": "macc", "alternative": "greater", "shift": 0.0,
     "test": "paired t-test over seeds, one-sided, H1: mean(recall - ce) > 0",
     "rule": f"held if the mean paired difference > 0 and p < {ALPHA}"},
    {"id": 2, "claim": "recall loss mIoU stays competitive with CE", "loss": RECALL_LOSS,
     "metric": "miou", "alternative": "greater", "shift": MIOU_MARGIN,
     "test": (f"paired non-inferiority t-test over seeds, one-sided, "
              f"H1: mean(recall - ce) > -{MIOU_MARGIN:g} points"),
     "rule": (f"held if p < {ALPHA}, i.e. the mIoU drop is significantly smaller than "
              f"{MIOU_MARGIN:g} points")},
    *({"id": 3, "claim": f"{w} pays in precision: mPrec below CE", "loss": w, "metric": "mprec",
       "alternative": "less", "shift": 0.0,
       "test": f"paired t-test over seeds, one-sided, H1: mean({w} - ce) < 0",
       "rule": f"held if the mean paired difference < 0 and p < {ALPHA}"}
      for w in WEIGHTED_LOSSES),
)


def _published_text(claim: dict, reference: Mapping) -> str:
    fig = {r["loss"]: r for r in reference.get("figure1", [])}
    if claim["id"] == 1 and {"ce", "recall"} <= set(fig):
        ce, rc = fig["ce"]["macc"], fig["recall"]["macc"]
        return f"{100 * (rc - ce) / ce:+.1f} % ({ce:g} -> {rc:g}, Fig. 1; text: +9 %)"
    if claim["id"] == 2 and {"ce", "recall"} <= set(fig):
        ce, rc = fig["ce"]["miou"], fig["recall"]["miou"]
        return f"{rc - ce:+.1f} points ({ce:g} -> {rc:g}, Fig. 1)"
    return "lower precision (stated in the text; no number in Fig. 1)"


def claims_table(runs: pd.DataFrame, reference: Mapping | None = None) -> pd.DataFrame:
    """One row per claim x dataset/backbone setting (x weighted loss for claim 3).

    Pairs are runs of the same seed, dataset and backbone. ``diff`` = mean over pairs of
    (loss - ce) in points, ``rel_change`` = 100 * diff / mean(ce over the pairs) in %.
    Verdicts: "held" / "not held" by the claim's ``rule``; "not testable" when the loss or CE has
    no finished run in the setting or fewer than 2 seeds are paired (``note`` says which).
    """
    reference = load_reference() if reference is None else reference
    if "role" not in runs.columns:
        runs = annotate_design(runs)
    settings = sorted(set(zip(runs["dataset"], runs["backbone"], runs["context"]))) if not runs.empty else []
    rows = []
    for claim in CLAIMS:
        for dataset, backbone, context in settings or [("-", "-", "")]:
            sub = runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone) & (runs["context"] == context)] \
                if settings else runs
            side, base = _side(sub, claim), sub[sub["role"] == "ce"]
            name = sorted(set(side["loss"]))[0] if side["loss"].nunique() == 1 else claim["loss"]
            setting = f"{dataset}/{backbone}" + (f" [{context}]" if context else "")
            row = {"claim_id": claim["id"], "claim": claim["claim"],
                   "setting": setting, "comparison": f"{name} vs ce",
                   "metric": LABELS[claim["metric"]], "verdict": "not testable",
                   "loss_mean": np.nan, "ce_mean": np.nan, "diff": np.nan,
                   "rel_change": np.nan, "published": _published_text(claim, reference),
                   "test": claim["test"], "p_value": np.nan, "n_pairs": 0, "note": ""}
            missing = [x for x, part in ((claim["loss"], side), (BASELINE, base)) if part.empty]
            several = [x for x, part in ((claim["loss"], side), (BASELINE, base)) if part["group"].nunique() > 1]
            if missing or several:
                row["note"] = (f"no finished {' or '.join(missing)} runs on {setting}" if missing and settings
                               else "no finished runs" if missing
                               else f"several {' and '.join(several)} variants match on {setting}: declare one "
                                    f"in the grid's claims section")
                rows.append(row)
                continue
            pairs = _paired(side, base, claim["metric"])
            n = len(pairs)
            row["n_pairs"] = n
            if n:
                d = (pairs["loss"] - pairs["base"]).to_numpy()
                row.update(loss_mean=float(pairs["loss"].mean()), ce_mean=float(pairs["base"].mean()),
                           diff=float(d.mean()))
                row["rel_change"] = 100.0 * row["diff"] / row["ce_mean"]
            if n < 2:
                row["note"] = f"only {n} seed(s) paired by seed; a paired test needs >= 2"
                rows.append(row)
                continue
            p = paired_one_sided_p(d, claim["alternative"], claim["shift"])
            side_ok = (d.mean() + claim["shift"] > 0) if claim["alternative"] == "greater" \
                else (d.mean() < 0)
            row["p_value"] = p
            row["verdict"] = "held" if (side_ok and p < ALPHA) else "not held"
            row["note"] = claim["rule"]
            rows.append(row)
    out = pd.DataFrame(rows)
    out["n_pairs"] = out["n_pairs"].astype(int)
    # rows are built in CLAIMS order; sort settings inside each claim, stably
    out["_order"] = [i for i, c in enumerate(CLAIMS) for _ in (settings or [None])]
    return out.sort_values(["_order", "setting"], kind="mergesort") \
              .drop(columns="_order").reset_index(drop=True)


# ----------------------------------------------------------------------------------------- output

PLAIN_LABELS: dict[str, str] = {
    "loss_mean": "loss mean", "ce_mean": "CE mean", "diff": "diff (points)",
    "rel_change": "rel. change (%)", "p_value": "p", "n_pairs": "n pairs", "claim_id": "#",
}


def _column_label(col: str) -> str:
    if col in PLAIN_LABELS:
        return PLAIN_LABELS[col]
    for m, lab in LABELS.items():
        if col == m:
            return lab
        if col.startswith(m + "_"):
            rest = col[len(m) + 1:]
            return {"std": f"{lab} sd", "ci95": f"{lab} 95% CI", "rel_ce": f"{lab} vs CE (%)",
                    "published": f"{lab} published", "repro": f"{lab} ours",
                    "diff": f"{lab} diff"}.get(rest, col)
    return col


def _is_int_col(s: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(s.dtype)


def _fmt(value, col: str, series: pd.Series, nan: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return nan
    if _is_int_col(series):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if col == "p_value":
            return "<0.001" if value < 0.001 else f"{value:.3f}"
        return f"{value:.2f}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table; numbers right-aligned, 2 decimals (p-values 3), NaN as ``-``."""
    labels = [_column_label(str(c)) for c in df.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c].dtype) else ":---" for c in df.columns]
    lines = ["| " + " | ".join(labels) + " |", "| " + " | ".join(align) + " |"]
    for _, r in df.iterrows():
        cells = [_fmt(r[c], str(c), df[c], "-").replace("|", "\\|") for c in df.columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    note = df.attrs.get("note")
    return text + (f"\n*Note:* {note}\n" if note else "")


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs tabular (\\toprule, \\midrule, \\bottomrule); the note as a comment line."""
    spec = "".join("r" if pd.api.types.is_numeric_dtype(df[c].dtype) else "l" for c in df.columns)
    lines = []
    if df.attrs.get("note"):
        lines.append("% " + df.attrs["note"].replace("\n", " "))
    lines += [f"\\begin{{tabular}}{{{spec or 'l'}}}", r"\toprule",
              " & ".join(_tex(_column_label(str(c))) for c in df.columns) + r" \\", r"\midrule"]
    for _, r in df.iterrows():
        lines.append(" & ".join(_tex(_fmt(r[c], str(c), df[c], "--")) for c in df.columns)
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Write ``{name}.md``, ``{name}.tex`` and ``{name}.csv`` per table; returns the paths.

    CSV keeps the raw column names and ``%.6g`` floats; re-running on the same input gives the same
    bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for name, df in tables.items():
        paths = {"md": out / f"{name}.md", "tex": out / f"{name}.tex", "csv": out / f"{name}.csv"}
        paths["md"].write_text(to_markdown(df), encoding="utf-8")
        paths["tex"].write_text(to_latex(df), encoding="utf-8")
        df.to_csv(paths["csv"], index=False, float_format="%.6g", lineterminator="\n")
        written[name] = paths
    return written



def supervision_share(runs: pd.DataFrame) -> pd.DataFrame:
    """Each weakly supervised method's mIoU as a share of full supervision, per data set and backbone.

    Full supervision = the runs with ``data.supervision: full`` and plain CE. share = 100 * mIoU(method) /
    mIoU(full) computed per seed (paired by seed), then mean and sd over seeds; ``n`` = paired seeds.
    Empty when the runs hold no ``params.data.supervision`` column or no full-supervision CE.
    """
    cols = ["dataset", "backbone", "loss", "supervision", "miou", "share", "share_std", "n"]
    key = "params.data.supervision"
    if runs.empty or key not in runs.columns:
        return pd.DataFrame(columns=cols)
    rows = []
    for (dataset, backbone), g in runs.groupby(["dataset", "backbone"], sort=True):
        full = g[(g[key] == "full") & (g["loss"] == BASELINE)].groupby("seed")["miou"].mean()
        if full.empty:
            continue
        for (loss, sup), m in g.groupby(["loss", key], sort=False):
            per_seed = m.groupby("seed")["miou"].mean()
            pairs = pd.concat({"m": per_seed, "full": full}, axis=1, join="inner").dropna()
            share = 100.0 * pairs["m"] / pairs["full"]
            rows.append({"dataset": dataset, "backbone": backbone, "loss": loss, "supervision": sup,
                         "miou": 100.0 * float(per_seed.mean()), "share": float(share.mean()) if len(share) else np.nan,
                         "share_std": float(share.std(ddof=1)) if len(share) > 1 else np.nan, "n": int(len(share))})
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out
    out["_full"] = (out["supervision"] != "full").astype(int)
    return out.sort_values(["dataset", "backbone", "_full", "share"], ascending=[True, True, True, False],
                           kind="mergesort").drop(columns="_full").reset_index(drop=True)

"""``write_report``: a study's MLflow runs -> tables, figures and a README.md that links them.

Layout of ``out_dir``::

    README.md                     header, claims inline, summary inline, figures embedded
    tables/{name}.{md,tex,csv}    summary, claims, published_comparison, per_class_{iou,recall,precision}[_{setting}]
    figures/{name}.{png,pdf}      miou_macc, recall_weights, per_class_bars, confusion, training_curves [_{setting}]

Deterministic: rows are sorted, no timestamps or absolute paths are written, figures carry no dates,
so running twice on the same store gives identical files.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import plots, tables
from analysis.collect import Collected, collect, curves, load_artifact_array, load_artifact_csv


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def class_frequency_for(col: Collected, dataset: str, reference: Mapping,
                        given: Mapping[str, Mapping[str, float]] | None = None,
                        ) -> tuple[dict[str, float] | None, str]:
    """Pixel share (%) per class of ``dataset`` and a sentence saying where it came from.

    Order of preference: ``given[dataset]``; for ``synthia`` the training frequencies printed in the
    paper's Figure 1; else the ``pixels`` column of ``metrics/per_class_{split}.csv`` of the first
    run of the data set (evaluation-split pixels: the trainer does not log training counts).
    """
    if given and dataset in given:
        return dict(given[dataset]), "class frequencies given to the report"
    if dataset == tables.PAPER_SETTING["dataset"] and reference.get("synthia_class_frequency_percent"):
        return ({str(k): float(v) for k, v in reference["synthia_class_frequency_percent"].items()},
                "class order: SYNTHIA training pixel frequencies printed in the paper's Figure 1")
    runs = col.runs[col.runs["dataset"] == dataset].sort_values("run_id")
    if runs.empty:
        return None, "class order: as logged"
    counts = runs["class_counts"].dropna() if "class_counts" in runs else []
    names = col.class_names.get(dataset) or []
    if len(counts) and names:
        values = np.asarray(json.loads(counts.iloc[0]), dtype=float)
        if len(values) == len(names) and values.sum() > 0:
            share = 100.0 * values / values.sum()
            return (dict(zip(names, share)),
                    "class order: pixel share of the training split (tag `study.class_counts`)")
    if col.tracking_uri is None:
        return None, "class order: as logged"
    row = runs.iloc[0]
    csv = load_artifact_csv(col.tracking_uri, row["run_id"], f"metrics/per_class_{row['metric_split']}.csv")
    if csv is None or not {"class", "pixels"} <= set(csv.columns) or csv["pixels"].sum() <= 0:
        return None, "class order: as logged (no per-class pixel counts found)"
    share = 100.0 * csv["pixels"].astype(float) / float(csv["pixels"].sum())
    names = [str(c).strip().lower().replace(" ", "_") for c in csv["class"]]
    return (dict(zip(names, share)),
            f"class order: pixel share of the {row['metric_split']} split "
            f"(`metrics/per_class_{row['metric_split']}.csv`; training counts are not logged)")


def _ordered_classes(names: Sequence[str], freq: Mapping[str, float] | None) -> list[str]:
    names = list(names)
    if freq:
        names.sort(key=lambda c: -float(freq.get(c, -np.inf)))
    return names


def _confusions(col: Collected, runs: pd.DataFrame, n_classes: int) -> dict[str, np.ndarray]:
    """Confusion counts summed over the seeds of each loss (artifact ``metrics/confusion_{split}.npy``)."""
    out: dict[str, np.ndarray] = {}
    for r in runs.sort_values("run_id").itertuples(index=False):
        mat = load_artifact_array(col.tracking_uri, r.run_id, f"metrics/confusion_{r.metric_split}.npy")
        if mat is None or mat.shape != (n_classes, n_classes):
            continue
        out[r.loss] = out.get(r.loss, 0) + mat.astype(np.int64)
    return out


def _figure_block(rel: str, alt: str, what: str) -> str:
    return (f"**{alt}.** {what}\n\n![{alt}]({rel}.png)\n\n"
            f"[PNG]({rel}.png) · [PDF]({rel}.pdf)\n")


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def _agreement_block(summary, agreement, reference, out: Path) -> list[str]:
    """The ordering-agreement section: Kendall's tau per setting and metric, and its figure."""
    if agreement.empty:
        return []
    lines = ["## Ordering agreement with Figure 1\n",
             "What this shows: how far this grid orders the losses as the paper's Figure 1 does, whatever "
             "the scale: Kendall's tau between the published and the reproduced values over the Figure 1 losses "
             "present (1 = same order, 0 = unrelated, -1 = reversed), with its two-sided p-value.\n",
             tables.to_markdown(agreement)]
    pairs = tables.figure1_pairs(summary, reference)
    for setting, g in pairs.groupby("setting", sort=True):
        if len(g) < 3:
            continue
        fig = f"figures/figure1_agreement_{_slug(setting)}"
        plots.plot_figure1_agreement(g, out / fig, title=f"Figure 1 (SYNTHIA) vs {setting}")
        lines.append(_figure_block(fig, "Figure 1 agreement", (
            "Each loss's published value (x) against this grid's mean (y), same colour per loss: "
            "a rising cloud is an agreeing order.")))
    return lines


def _design(grid) -> tuple[str | None, dict | None]:
    """(grid name, spec hash -> {axes, role}) of a loaded grid; a plain name has no design."""
    if grid is None or isinstance(grid, str):
        return grid, None
    return grid.name, {r.hash: {"axes": r.axes, "role": r.role} for r in grid.runs}


def write_report(tracking_uri: str, out_dir: str | Path, grid=None,
                 experiment_names: Sequence[str] | None = None,
                 experiment_ids: Sequence[str] | None = None, parent_run_id: str | None = None,
                 split: str = "test",
                 class_frequency: Mapping[str, Mapping[str, float]] | None = None,
                 reference: Mapping | None = None, include_unfinished: bool = False) -> Path:
    """Collect the runs, write all tables, figures and ``out_dir/README.md``; return its path.

    ``grid``: a loaded :class:`study.grid.Grid` (its runs, axes and claims roles define the report's
    rows) or a grid name. ``class_frequency`` maps data set -> {class: pixel share} to order classes
    (see ``class_frequency_for`` for the default). Raises ValueError when no run matches.
    """
    out = Path(out_dir)
    grid, design = _design(grid)
    reference = tables.load_reference() if reference is None else reference
    col = collect(tracking_uri, experiment_ids=experiment_ids, experiment_names=experiment_names,
                  parent_run_id=parent_run_id, grid=grid, split=split,
                  include_unfinished=include_unfinished)
    runs = col.runs
    if design is not None:
        runs = runs[runs["spec_hash"].isin(set(design))].reset_index(drop=True)
    runs = tables.annotate_design(runs, design)
    col.classes = col.classes[col.classes["run_id"].isin(set(runs["run_id"]))].copy()
    col.classes["loss"] = col.classes["run_id"].map(dict(zip(runs["run_id"], runs["loss"])))
    if runs.empty:
        raise ValueError(f"write_report: no {'' if include_unfinished else 'finished '}runs match "
                         f"grid={grid!r}, experiment_names={experiment_names}, "
                         f"experiment_ids={experiment_ids}, parent_run_id={parent_run_id!r}")
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)

    summary = tables.summary_table(runs)
    claims = tables.claims_table(runs, reference)
    published = tables.published_comparison(summary, reference)
    agreement = tables.ordering_agreement(summary, reference)
    all_tables: dict[str, pd.DataFrame] = {"summary": summary, "claims": claims,
                                           "published_comparison": published, "ordering_agreement": agreement}
    agreement_block = _agreement_block(summary, agreement, reference, out)
    share = tables.supervision_share(runs)
    share_block = []
    if not share.empty and (share["supervision"] != "full").any():
        all_tables["supervision_share"] = share
        share_block = ["## Share of full supervision\n",
                       "What this shows: each method's test mIoU as a percentage of the full-label CE run of the same "
                       "seed, data set and backbone (mean ± sd over paired seeds) — the number the weakly "
                       "supervised literature reports. Scribbles label a few % of the training pixels "
                       "(metric `data/labelled_fraction/train` of each run).\n",
                       tables.to_markdown(share)]
    settings = sorted(set(zip(runs["dataset"], runs["backbone"])))
    sections: list[str] = []
    for dataset, backbone in settings:
        suffix = "" if len(settings) == 1 else f"_{_slug(dataset)}_{_slug(backbone)}"
        srun = runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)]
        scls = col.classes[(col.classes["dataset"] == dataset) & (col.classes["backbone"] == backbone)]
        freq, freq_note = class_frequency_for(col, dataset, reference, class_frequency)
        names = _ordered_classes(col.class_names.get(dataset, list(dict.fromkeys(scls["class"]))), freq)
        lines = [f"## {dataset} / {backbone}\n", f"{freq_note}.\n"]

        for metric in ("iou", "recall", "precision"):
            all_tables[f"per_class_{metric}{suffix}"] = tables.per_class_table(
                scls, metric, class_frequency=freq, dataset=dataset, backbone=backbone)
        lines.append("Per-class tables (rows = losses, columns = classes, mean over seeds, %): "
                     + " · ".join(f"[{m}](tables/per_class_{m}{suffix}.md)"
                                  for m in ("iou", "recall", "precision")) + "\n")

        ssum = summary[(summary["dataset"] == dataset) & (summary["backbone"] == backbone)]
        fig = f"figures/miou_macc{suffix}"
        plots.plot_miou_macc(ssum, out / fig, reference)
        lines.append(_figure_block(fig, "mIoU vs mAcc", (
            "Each loss's mean over seeds with ± sd error bars; up-and-right is better on both. "
            "Hollow markers are the paper's Figure 1 values, drawn only for the paper's setting.")))

        declared = sorted(set(srun[srun["role"] == "recall"]["loss"]))
        family = sorted(set(srun[srun["loss_name"].isin(["recall", "recall_focal"])]["loss"]))
        rl = declared[0] if declared else (family[0] if family else None)
        if rl is not None:
            rids = sorted(srun[srun["loss"] == rl]["run_id"])
            wc = curves(tracking_uri, rids, [f"recall_weight/{c}" for c in names])
            if not wc.empty:
                fig = f"figures/recall_weights{suffix}"
                plots.plot_recall_weights(wc, names, out / fig, class_frequency=freq,
                                          title=f"{rl} class weights, mean over {len(rids)} seed(s)")
                lines.append(_figure_block(fig, "Recall-loss class weights", (
                    "Weight of each class (its current false-negative rate) over training, "
                    "legend from the most to the least frequent class: rare classes keep "
                    "larger weights.")))
        else:
            lines.append("*No recall-loss runs in this setting: no class-weight figure.*\n")

        present = [l for l in plots.BAR_LOSSES if l in set(scls["loss"])]
        if present:
            fig = f"figures/per_class_bars{suffix}"
            plots.plot_per_class_bars(scls, names, out / fig, losses=present)
            lines.append(_figure_block(fig, "Per-class recall and precision", (
                f"Recall (top) and precision (bottom) per class for {', '.join(present)}: "
                "the trade-off the paper argues about, rare classes on the right.")))

        conf = _confusions(col, srun, len(names)) if names else {}
        if conf:
            logged = col.class_names.get(dataset, names)
            fig = f"figures/confusion{suffix}"
            plots.plot_confusions(conf, logged, out / fig,
                                  title=f"row-normalised confusion, summed over seeds ({dataset})")
            lines.append(_figure_block(fig, "Confusion matrices", (
                "Row-normalised confusion per loss (rows = true class): the diagonal is the "
                "per-class recall, off-diagonal mass shows which classes absorb the errors.")))

        tc = curves(tracking_uri, sorted(srun["run_id"]), ["train/loss", "val/miou"])
        if not tc.empty:
            fig = f"figures/training_curves{suffix}"
            plots.plot_training_curves(tc, dict(zip(srun["run_id"], srun["loss"])), out / fig)
            lines.append(_figure_block(fig, "Training curves", (
                "Training loss and validation mIoU against iteration per loss (mean over seeds, "
                "band = min..max); losses are on different scales, compare shapes.")))
        sections.append("\n".join(lines))

    written = tables.write_tables(all_tables, out / "tables")

    n_val = int((runs["metric_split"] != split).sum())
    grid_names = sorted(set(runs["grid"].dropna()))
    head = [
        f"# Results: grid `{grid or _join(grid_names) or 'all runs'}`\n",
        f"- Runs: {len(runs)} {'' if include_unfinished else 'finished '}runs "
        f"({runs['loss'].nunique()} losses); metrics from the `{split}` split"
        + (f" ({n_val} run(s) without it fall back to `val`)" if n_val else "") + ".",
        f"- Data set(s): {_join(sorted(set(runs['dataset'])))}; backbone(s): "
        f"{_join(sorted(set(runs['backbone'])))}; arch(s): {_join(sorted(set(runs['arch'].dropna())))}.",
        f"- Seeds: {_join(sorted(set(int(s) for s in runs['seed'].dropna())))}.",
        f"- Losses: {_join(sorted(set(runs['loss']), key=tables.loss_sort_key))}.",
        "- All metrics in %; mean ± sd over seeds, 95 % CI half-width from Student's t.",
        "- Regenerate with `study report`; the same runs give byte-identical files.\n",
    ]
    claims_view = claims.drop(columns=["claim_id"])
    rules = [f"- {c['claim']}: {c['test']}; {c['rule']}." for c in tables.CLAIMS]
    body = [
        "## Claims of the paper\n",
        "What this shows: whether each claim held in these runs, tested on seed-paired "
        f"differences (same seed, data set and backbone) at one-sided alpha = {tables.ALPHA}. "
        "`diff` = mean over pairs of (loss - CE) in points, `rel. change` in % of CE. "
        "A claim that did not reach significance is reported as not held.\n",
        tables.to_markdown(claims_view),
        "Rules:\n\n" + "\n".join(rules) + "\n",
        "[claims.md](tables/claims.md) · [claims.csv](tables/claims.csv) · "
        "[claims.tex](tables/claims.tex)\n",
        "## Summary over seeds\n",
        "What this shows: mIoU, mAcc and mPrec per loss (mean, sd, 95 % CI half-width, n seeds) "
        "and the relative change of the mean against CE on the same data set and backbone.\n",
        tables.to_markdown(summary),
        *share_block,
        *agreement_block,
        "## Published numbers (Figure 1)\n",
        "What this shows: the paper's digitised Figure 1 beside this reproduction, only where "
        "the setting matches the paper's.\n",
        tables.to_markdown(published),
        *sections,
        "## Table files\n",
        "\n".join(f"- {name}: [md](tables/{p['md'].name}) · [tex](tables/{p['tex'].name}) · "
                  f"[csv](tables/{p['csv'].name})" for name, p in sorted(written.items())) + "\n",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(head) + "\n" + "\n".join(body), encoding="utf-8")
    if grid:
        try:
            publish_to_parent_run(tracking_uri, out, grid, claims_view, summary,
                                  _experiment_ids(tracking_uri, experiment_ids, experiment_names, runs))
        except Exception as err:  # noqa: BLE001 - the report on disk is complete; the UI copy is extra
            warnings.warn(f"report written to {out}, but not logged to the grid's parent run: {err}", stacklevel=2)
    return readme


# ----------------------------------------------------------------------------- the report in the MLflow UI

#: MLflow keeps at most 8000 characters of a tag value; the description stays below.
DESCRIPTION_CHARS = 7500
#: Columns of the claims table left to tables/claims.md (the description keeps verdicts and numbers).
CLAIM_DETAIL_COLUMNS = ("published", "test")
HEADLINE_COLUMNS = ("miou", "miou_std", "macc", "macc_std", "mprec", "mprec_std", "miou_rel_ce")


def _experiment_ids(tracking_uri: str, ids, names, runs: pd.DataFrame) -> list[str]:
    """The experiments to search for the grid's parent run: those given, else those of the runs."""
    from mlflow.tracking import MlflowClient

    found = [str(i) for i in ids or []]
    client = MlflowClient(tracking_uri)
    for name in names or []:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            found.append(exp.experiment_id)
    if not found and "experiment_id" in runs:
        found = sorted(set(runs["experiment_id"].dropna().astype(str)))
    return sorted(set(found))


def grid_parent_run_id(tracking_uri: str, experiment_ids: Sequence[str], grid_name: str) -> str | None:
    """The run tagged ``study.grid_parent`` = ``grid_name`` (created by the launcher), or None."""
    from mlflow.tracking import MlflowClient

    if not experiment_ids:
        return None
    runs = MlflowClient(tracking_uri).search_runs(
        list(experiment_ids), filter_string=f"tags.`study.grid_parent` = '{grid_name}'", max_results=1)
    return runs[0].info.run_id if runs else None


def fit_table(view: pd.DataFrame, budget: int, where: str) -> str:
    """``view`` as markdown, its rows cut to fit ``budget`` characters; a cut table names ``where``
    the rest is."""
    for n in range(len(view), 0, -1):
        text = tables.to_markdown(view.head(n))
        if n < len(view):
            text += f"\n*{len(view) - n} more row(s) in {where}.*\n"
        if len(text) <= budget:
            return text
    return f"*See {where}.*\n"


def headline_view(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's setting columns, the means and sds, and mIoU vs CE."""
    prefixes = tuple(f"{m}_" for m in tables.METRICS)
    keep = [c for c in summary.columns if c not in tables.METRICS and not c.startswith(prefixes)]
    return summary[keep + [c for c in HEADLINE_COLUMNS if c in summary.columns]]


def parent_description(grid_name: str, claims: pd.DataFrame, summary: pd.DataFrame, run_id: str,
                       figure: str | None) -> str:
    """The grid parent run's description (markdown): the claims verdicts, the headline numbers
    (summary mean and sd per setting, in %), one figure, and where the full report is."""
    parts = [f"## Results of grid `{grid_name}`\n",
             "Full report: artifacts `README.md`, `tables/`, `figures/` of this run (`study report`).\n",
             "### Claims of the paper\n",
             fit_table(claims.drop(columns=[c for c in CLAIM_DETAIL_COLUMNS if c in claims.columns]),
                       DESCRIPTION_CHARS // 2, "tables/claims.md"),
             "Tests and published values: tables/claims.md.\n"]
    if figure:
        parts.append(f"![{figure}](get-artifact?path={figure}&run_uuid={run_id})\n")
    used = sum(len(p) + 1 for p in parts) + 200
    parts += ["### Headline numbers (mean and sd over seeds, %)\n",
              fit_table(headline_view(summary), max(DESCRIPTION_CHARS - used, 0), "tables/summary.md")]
    return "\n".join(parts)


def publish_to_parent_run(tracking_uri: str, out_dir: Path, grid_name: str, claims: pd.DataFrame,
                          summary: pd.DataFrame, experiment_ids: Sequence[str]) -> str | None:
    """Log ``README.md``, ``tables/`` and ``figures/`` of ``out_dir`` as artifacts of the grid's parent
    run and set its description (``mlflow.note.content``); returns its id, None without a parent run."""
    from mlflow.tracking import MlflowClient

    run_id = grid_parent_run_id(tracking_uri, experiment_ids, grid_name)
    if run_id is None:
        return None
    client = MlflowClient(tracking_uri)
    client.log_artifact(run_id, str(out_dir / "README.md"))
    for folder in ("tables", "figures"):
        client.log_artifacts(run_id, str(out_dir / folder), folder)
    figs = sorted((out_dir / "figures").glob("miou_macc*.png")) or sorted((out_dir / "figures").glob("*.png"))
    figure = f"figures/{figs[0].name}" if figs else None
    client.set_tag(run_id, "mlflow.note.content", parent_description(grid_name, claims, summary, run_id, figure))
    return run_id

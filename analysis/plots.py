"""Figures of a study (matplotlib Agg + seaborn), each written as PNG and PDF with identical bytes
on re-runs (no dates or software stamps in the metadata).

Figures are built on ``matplotlib.figure.Figure`` objects (no pyplot state), so importing this module
changes no global backend. Every plot function takes an output path *without* suffix and returns
the written ``[png, pdf]`` paths.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.tables import LOSS_ORDER, PAPER_SETTING, loss_sort_key

PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
DPI = 150
BAR_LOSSES: tuple[str, ...] = ("ce", "weighted_ce", "recall")
_RC = {"svg.hashsalt": "recall-study", "pdf.compression": 6, "figure.dpi": DPI,
       "font.family": "DejaVu Sans", "legend.frameon": False}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(_RC), sns.axes_style("whitegrid"):
        yield


def _figure(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, base: str | Path) -> list[Path]:
    """``base.png`` and ``base.pdf`` without date/software metadata (byte-identical re-runs)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = base.with_suffix(".png"), base.with_suffix(".pdf")
    fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight", metadata=PNG_METADATA)
    fig.savefig(pdf, format="pdf", bbox_inches="tight", metadata=PDF_METADATA)
    return [png, pdf]


def loss_colors(losses: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per loss: known losses keep their colour across all figures and grids."""
    palette = sns.color_palette("tab10", 10) + sns.color_palette("Dark2", 8)
    extra = sorted(set(losses) - set(LOSS_ORDER))
    order = list(LOSS_ORDER) + extra
    return {loss: palette[order.index(loss) % len(palette)] for loss in losses}


def _legend_right(ax, handles=None, labels=None, title=None) -> None:
    kwargs = {} if handles is None else {"handles": handles, "labels": labels}
    ax.legend(**kwargs, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)


def plot_miou_macc(summary: pd.DataFrame, out_base: str | Path,
                   reference: Mapping | None = None) -> list[Path]:
    """mIoU (x) vs mAcc (y) per loss, error bars = std over seeds (Figure 1 right).

    ``summary`` (``tables.summary_table``) must hold one dataset/backbone. The published points are
    drawn as hollow markers of the loss's colour only when that setting is the paper's.
    """
    settings = sorted(set(zip(summary["dataset"], summary["backbone"])))
    if len(settings) != 1:
        raise ValueError(f"plot_miou_macc: summary must hold one dataset/backbone, got {settings}")
    dataset, backbone = settings[0]
    matches = (dataset, backbone) == (PAPER_SETTING["dataset"], PAPER_SETTING["backbone"])
    published = {r["loss"]: r for r in (reference or {}).get("figure1", [])} if matches else {}
    rows = summary.assign(_k=summary["loss"].map(loss_sort_key)).sort_values("_k")
    colors = loss_colors(sorted(set(rows["loss"]) | set(published), key=loss_sort_key))
    with _style():
        fig = _figure(6.4, 4.6)
        ax = fig.add_subplot(1, 1, 1)
        handles, labels = [], []
        for r in rows.itertuples(index=False):
            c = colors[r.loss]
            xerr = 0.0 if not np.isfinite(r.miou_std) else r.miou_std
            yerr = 0.0 if not np.isfinite(r.macc_std) else r.macc_std
            h = ax.errorbar(r.miou, r.macc, xerr=xerr, yerr=yerr, fmt="o", color=c, ms=7,
                            capsize=3, elinewidth=1)
            handles.append(h)
            labels.append(f"{r.loss} (n={r.n})")
        for loss in sorted(published, key=loss_sort_key):
            p = published[loss]
            ax.plot(p["miou"], p["macc"], "o", ms=9, mfc="none", mec=colors[loss], mew=1.6)
        if published:
            handles.append(Line2D([], [], ls="none", marker="o", ms=9, mfc="none", mec="0.3",
                                  mew=1.6))
            labels.append("published (Fig. 1)")
        ax.set_xlabel("mIoU (%)")
        ax.set_ylabel("mean accuracy, mAcc (%)")
        title = f"mIoU vs mAcc, {dataset} / {backbone}, mean ± sd over seeds"
        if not matches:
            title += ("\npublished Fig. 1 points not drawn: the paper's setting is "
                      f"{PAPER_SETTING['dataset']} / {PAPER_SETTING['backbone']}")
        ax.set_title(title, fontsize=9)
        _legend_right(ax, handles, labels, title="loss")
        return save_figure(fig, out_base)


def plot_recall_weights(curves: pd.DataFrame, class_order: Sequence[str], out_base: str | Path,
                        class_frequency: Mapping[str, float] | None = None,
                        title: str = "recall loss class weights") -> list[Path]:
    """``recall_weight/{class}`` vs iteration, mean over seeds, one line per class (Figure 1 left).

    ``curves`` is ``collect.curves`` output; legend in ``class_order`` (by pixel frequency).
    """
    df = curves[curves["key"].str.startswith("recall_weight/")].copy()
    if df.empty:
        raise ValueError("plot_recall_weights: no 'recall_weight/{class}' curves given")
    df["class"] = df["key"].str.slice(len("recall_weight/"))
    mean = df.groupby(["class", "step"])["value"].mean()
    names = [c for c in class_order if c in mean.index.get_level_values(0)]
    names += sorted(set(mean.index.get_level_values(0)) - set(names))
    palette = sns.color_palette("husl", len(names))
    with _style():
        fig = _figure(7.0, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for i, cls in enumerate(names):
            s = mean.loc[cls]
            label = cls
            if class_frequency is not None and cls in class_frequency:
                label = f"{cls} ({class_frequency[cls]:.3g} %)"
            ax.plot(s.index.to_numpy(), s.to_numpy(), color=palette[i], lw=1.5, label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("class weight (1 - recall)")
        ax.set_title(title, fontsize=9)
        _legend_right(ax, title="class (pixel share)" if class_frequency else "class")
        return save_figure(fig, out_base)


def plot_per_class_bars(classes: pd.DataFrame, class_order: Sequence[str], out_base: str | Path,
                        losses: Sequence[str] = BAR_LOSSES, title: str = "") -> list[Path]:
    """Grouped bars of per-class recall (top) and precision (bottom), mean ± sd over seeds (%)."""
    present = [loss for loss in losses if loss in set(classes["loss"])]
    if not present:
        raise ValueError(f"plot_per_class_bars: none of the losses {list(losses)} has runs")
    df = classes[classes["loss"].isin(present)]
    names = [c for c in class_order if c in set(df["class"])]
    colors = loss_colors(present)
    width = 0.8 / len(present)
    x = np.arange(len(names))
    with _style():
        fig = _figure(max(6.0, 0.55 * len(names) * len(present) / 2 + 3), 6.0)
        axes = [fig.add_subplot(2, 1, i + 1) for i in range(2)]
        for ax, metric in zip(axes, ("recall", "precision")):
            stats_ = df.groupby(["loss", "class"])[metric].agg(["mean", "std"]) * 100.0
            for j, loss in enumerate(present):
                s = stats_.loc[loss].reindex(names)
                ax.bar(x + (j - (len(present) - 1) / 2) * width, s["mean"].to_numpy(), width,
                       yerr=s["std"].fillna(0.0).to_numpy(), color=colors[loss], label=loss,
                       capsize=2, error_kw={"elinewidth": 0.8})
            ax.set_ylabel(f"{metric} (%)")
            ax.set_ylim(0, 105)
            ax.set_xticks(x)
            ax.set_xticklabels(names if metric == "precision" else [], rotation=45, ha="right")
            ax.set_xlim(-0.6, len(names) - 0.4)
        axes[-1].set_xlabel("class (by decreasing pixel frequency)")
        axes[0].set_title(title or "per-class recall and precision, mean ± sd over seeds",
                          fontsize=9)
        _legend_right(axes[0], title="loss")
        return save_figure(fig, out_base)


def row_normalise(mat: np.ndarray) -> np.ndarray:
    """Confusion counts -> rows summing to 1 (rows = ground truth); empty rows become NaN."""
    m = np.asarray(mat, dtype=float)
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, m / totals, np.nan)


def plot_confusions(matrices: Mapping[str, np.ndarray], class_names: Sequence[str],
                    out_base: str | Path, title: str = "") -> list[Path]:
    """Row-normalised confusion heatmaps, one panel per key of ``matrices`` (e.g. per loss)."""
    if not matrices:
        raise ValueError("plot_confusions: no confusion matrices given")
    keys = sorted(matrices, key=loss_sort_key)
    n = len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    c = len(class_names)
    side = max(3.5, 0.32 * c + 1.5)
    annot = c <= 10  # numbers become unreadable beyond ~10 classes
    with _style():
        fig = _figure(side * ncols + 1.2, side * nrows + 0.4, layout="constrained")
        axes = []
        for i, key in enumerate(keys):
            mat = np.asarray(matrices[key])
            if mat.shape != (c, c):
                raise ValueError(f"plot_confusions: matrix {key!r} has shape {mat.shape}, "
                                 f"expected ({c}, {c}) for classes {list(class_names)}")
            ax = fig.add_subplot(nrows, ncols, i + 1)
            sns.heatmap(row_normalise(mat), ax=ax, vmin=0.0, vmax=1.0, cmap="viridis",
                        square=True, xticklabels=list(class_names), yticklabels=list(class_names),
                        annot=annot, fmt=".2f", annot_kws={"fontsize": 5}, cbar=False)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("predicted class")
            ax.set_ylabel("ground-truth class" if i % ncols == 0 else "")
            ax.tick_params(axis="x", labelsize=6, labelrotation=90)
            ax.tick_params(axis="y", labelsize=6, labelrotation=0)
            axes.append(ax)
        fig.colorbar(axes[0].collections[0], ax=axes, shrink=0.6,
                     label="fraction of the true class (row-normalised)")
        if title:
            fig.suptitle(title, fontsize=10)
        return save_figure(fig, out_base)


def plot_training_curves(curves: pd.DataFrame, run_loss: Mapping[str, str], out_base: str | Path,
                         title: str = "") -> list[Path]:
    """``train/loss`` and ``val/miou`` vs iteration per loss: mean over seeds, band = min..max."""
    df = curves[curves["key"].isin(["train/loss", "val/miou"])].copy()
    df["loss"] = df["run_id"].map(run_loss)
    df = df.dropna(subset=["loss"])
    losses = sorted(set(df["loss"]), key=loss_sort_key)
    if not losses:
        raise ValueError("plot_training_curves: no train/loss or val/miou curves for the runs")
    colors = loss_colors(losses)
    with _style():
        fig = _figure(11.0, 4.0)
        axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
        for ax, key, ylabel, scale in ((axes[0], "train/loss", "training loss", 1.0),
                                       (axes[1], "val/miou", "validation mIoU (%)", 100.0)):
            for loss in losses:
                g = df[(df["key"] == key) & (df["loss"] == loss)]
                if g.empty:
                    continue
                s = g.groupby("step")["value"].agg(["mean", "min", "max"]) * scale
                steps = s.index.to_numpy()
                ax.plot(steps, s["mean"].to_numpy(), color=colors[loss], lw=1.5, label=loss)
                ax.fill_between(steps, s["min"].to_numpy(), s["max"].to_numpy(),
                                color=colors[loss], alpha=0.15, lw=0)
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
        axes[0].set_title("training loss (mean over seeds, band = min..max)", fontsize=9)
        axes[1].set_title("validation mIoU (mean over seeds, band = min..max)", fontsize=9)
        _legend_right(axes[1], title="loss")
        if title:
            fig.suptitle(title, fontsize=10)
        return save_figure(fig, out_base)


def plot_figure1_agreement(pairs: pd.DataFrame, out_base: str | Path, title: str = "") -> list[Path]:
    """Published Figure 1 value (x) vs this grid's value (y) per loss, for mIoU and mAcc (one setting).

    A published point and its reproduction share the loss's colour; a monotone cloud means the grid
    orders the losses as the paper did, whatever the scale (the ordering agreement table gives tau).
    """
    colors = loss_colors(sorted(set(pairs["loss"]), key=loss_sort_key))
    with _style():
        fig = _figure(9.0, 4.0)
        for i, (m, label) in enumerate((("miou", "mIoU"), ("macc", "mAcc"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for r in pairs.itertuples(index=False):
                ax.plot(getattr(r, f"{m}_published"), getattr(r, f"{m}_repro"), "o", ms=7, color=colors[r.loss])
                ax.annotate(r.figure1, (getattr(r, f"{m}_published"), getattr(r, f"{m}_repro")), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            ax.set_xlabel(f"published {label} (Fig. 1, SYNTHIA) (%)")
            ax.set_ylabel(f"this grid's {label} (%)")
        if title:
            fig.suptitle(title, fontsize=9)
        return save_figure(fig, out_base)

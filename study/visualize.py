"""Small figures and tables logged with every run: per-class CSV, confusion PNG, prediction overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch


def palette(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable RGB colour per class (tab20), uint8 [C, 3]; ignore is black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return (np.array([cmap(i % 20)[:3] for i in range(num_classes)]) * 255).astype(np.uint8)


def per_class_csv(result: dict, mat: np.ndarray, class_names: list[str], path: Path) -> None:
    """Columns: class, iou, recall, precision, f1, pixels (ground-truth pixels of the class)."""
    pixels = mat.sum(axis=1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "recall", "precision", "f1", "pixels"])
        for i, name in enumerate(class_names):
            w.writerow([name] + [f"{float(result[k][i]):.6f}" for k in ("iou", "recall", "precision", "f1")] + [int(pixels[i])])


def confusion_png(mat: np.ndarray, class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows: ground truth) as a labelled heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mat.sum(axis=1, keepdims=True)
    norm = np.divide(mat, rows, out=np.zeros_like(mat, dtype=float), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2.5, 0.45 * n + 2))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    fig.colorbar(im, ax=ax, label="fraction of ground-truth pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


@torch.no_grad()
def prediction_overlays(model, dataset, count: int, device, out_dir: Path, ignore_index: int = 255) -> None:
    """For the first ``count`` samples: image | ground truth | prediction, side by side, as PNG."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        logits = model(image[None].to(device))
        pred = logits.argmax(1)[0].cpu().numpy()
        target = target.numpy()
        num_classes = logits.shape[1]
        colours = np.vstack([palette(num_classes), np.zeros((1, 3), np.uint8)])
        tgt = np.where(target == ignore_index, num_classes, np.clip(target, 0, num_classes))
        img = image.permute(1, 2, 0).cpu().numpy()
        img = ((img - img.min()) / max(float(img.max() - img.min()), 1e-6) * 255).astype(np.uint8)
        panel = np.concatenate([img, colours[tgt], colours[pred]], axis=1)
        Image.fromarray(panel).save(out_dir / f"test_{i:03d}.png")
    model.train()

"""SEMEDA (Chen, Dapogny & Cord, 2020): CE plus a feature-matching loss through a semantic edge network.

The edge network is a model (``study.models.edge_net``): trained once on the training split's ground-truth
masks (``edge_net: train_masks``, the method's choice; the trainer hands the masks over, the network is
cached by the masks' digest and logged to the run), or on synthetic blobs (``edge_net: blobs``), or loaded
from ``edge_net_path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from study.models.edge_net import (DEFAULT_WIDTHS, DISTANCES, BlobMasks, EdgeNet, default_cache_dir,  # noqa: F401
                                   edge_targets, load_edge_net, train_edge_net)

from ._functional import SegLoss, extended_target, masked_mean, one_hot, pixel_cross_entropy


class SemedaLoss(SegLoss):
    """L = CE + weight * sum_l mean |F_l(p~) - F_l(y~)|  (``distance="l2"``: mean squared difference)

    F_l = output of block l of the frozen edge network (``EdgeNet``: every block's features, not the edge
    logits), p~ = softmax(x), y~ = one-hot target, both set to the all-zero vector at ignored pixels; the
    mean runs over all N x C_l x H_l x W_l elements of the layer; CE is the mean over valid pixels.
    No gradient reaches the edge network (its parameters are frozen; the y~ branch runs without graph).

    The edge net: ``edge_net_path`` (a file written by ``train_edge_net``), else trained for ``train_steps``
    steps with ``widths`` on the training split's masks (``edge_net: train_masks``, default, as the paper
    does; ``train_masks`` is supplied by the run) or on synthetic ``BlobMasks`` (``edge_net: blobs``), and
    cached in ``cache_dir`` (default ``default_cache_dir()``). ``weight`` default 1.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, weight: float = 1.0,
                 distance: Literal["l1", "l2"] = "l1", edge_net: Literal["train_masks", "blobs"] = "train_masks",
                 edge_net_path: str | None = None, cache_dir: str | None = None, train_steps: int = 200,
                 widths: Sequence[int] = DEFAULT_WIDTHS, train_masks: np.ndarray | None = None) -> None:
        super().__init__(num_classes, ignore_index)
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.weight = float(weight)
        self.distance = distance
        self.edge_net_file: Path | None = None  # where the network used lives (logged to the run)
        if edge_net_path is not None:
            if not Path(edge_net_path).expanduser().is_file():
                raise ValueError(f"edge_net_path {edge_net_path!r} is not a file")
            self.edge_net = load_edge_net(edge_net_path, num_classes)
            self.edge_net_file = Path(edge_net_path).expanduser()
        elif edge_net == "train_masks" and train_masks is None:
            raise ValueError("edge_net: 'train_masks' needs the training split's masks (the trainer passes "
                             "them); use edge_net: blobs or edge_net_path standalone")
        else:
            masks = None if edge_net == "blobs" else train_masks
            self.edge_net, self.edge_net_file = train_edge_net(num_classes, masks, train_steps,
                                                               ignore_index=ignore_index, widths=widths,
                                                               cache_dir=cache_dir)
        self.edge_net_path = edge_net_path
        self.edge_net_source = "file" if edge_net_path is not None else edge_net

    def feature_distance(self, p: Tensor, y: Tensor) -> Tensor:
        """sum over layers of mean |F_l(p) - F_l(y)| (or squared), gradient only through ``p``."""
        with torch.no_grad():
            target_feats = self.edge_net.features(y)
        total = p.new_zeros(())
        for fp, fy in zip(self.edge_net.features(p), target_feats):
            diff = fp - fy
            total = total + (diff.abs() if self.distance == "l1" else diff * diff).mean()
        return total

    def compute(self, x: Tensor, target: Tensor) -> Tensor:
        c = self.num_classes
        t_ext = extended_target(target, c, self.ignore_index)
        valid = (t_ext < c).to(x.dtype)
        ce = masked_mean(pixel_cross_entropy(x, target, self.ignore_index), valid)
        if self.weight == 0.0:
            return ce
        ref = next(self.edge_net.parameters())
        if ref.dtype != x.dtype or ref.device != x.device:  # float64 inputs (gradcheck), or a loss left behind
            self.edge_net.to(device=x.device, dtype=x.dtype)
        p = x.softmax(1) * valid.unsqueeze(1)
        y = one_hot(t_ext, c, x.dtype)
        # all pixels ignored: p and y are both all-zero, but the graph and no-graph convolution paths may round
        # differently (~1e-8); return the exact 0 of the contract
        term = torch.where(valid.sum() > 0, self.feature_distance(p, y), p.new_zeros(()))
        return ce + self.weight * term

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight={self.weight}, distance={self.distance!r}, "
                f"edge_net_path={self.edge_net_path!r}")

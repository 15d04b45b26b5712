"""SEMEDA's semantic edge network (Chen, Dapogny & Cord, 2020): a model trained on label maps, frozen.

The edge network takes a (soft) class mask ``[N,C,H,W]`` and predicts per-class semantic edges. SEMEDA
trains it on the data set's ground-truth masks: :func:`train_edge_net` does that once per set of masks and
caches the frozen network on disk under a key made of the number of classes, the architecture, the training
settings and a SHA-256 of the masks, so every run on the same data reuses it (and the network is a function
of the run's identity: data content + loss settings). Synthetic blob label maps (``BlobMasks``) remain as an
explicit option for standalone use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.losses._functional import extended_target, one_hot

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 32)
DISTANCES = ("l1", "l2")


def default_cache_dir() -> Path:
    """``$STUDY_CACHE/semeda`` when STUDY_CACHE is set, else ``$XDG_CACHE_HOME/recall-study/semeda``
    (``~/.cache/recall-study/semeda``)."""
    if os.environ.get("STUDY_CACHE"):
        return Path(os.environ["STUDY_CACHE"]) / "semeda"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recall-study" / "semeda"


class EdgeNet(nn.Module):
    """Small semantic edge network: blocks of (2x2 max-pool except first) conv3x3-ReLU-conv3x3-ReLU of
    ``widths`` channels; a 1x1 side output of C channels per block, upsampled (bilinear) and summed, gives
    the per-class edge logits. No normalisation layers (so train/eval mode does not matter)."""

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        blocks, sides, c_in = [], [], self.num_classes
        for w in self.widths:
            blocks.append(nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(w, w, 3, padding=1), nn.ReLU()))
            sides.append(nn.Conv2d(w, self.num_classes, 1))
            c_in = w
        self.blocks = nn.ModuleList(blocks)
        self.sides = nn.ModuleList(sides)

    def features(self, m: Tensor) -> list[Tensor]:
        """Output of every block (the layers whose responses SEMEDA matches)."""
        feats = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                m = F.max_pool2d(m, 2, ceil_mode=True)
            m = block(m)
            feats.append(m)
        return feats

    def forward(self, m: Tensor) -> Tensor:
        size = m.shape[-2:]
        out = 0
        for side, f in zip(self.sides, self.features(m)):
            out = out + F.interpolate(side(f), size=size, mode="bilinear", align_corners=False)
        return out


def edge_targets(target_ext: Tensor, num_classes: int) -> Tensor:
    """Per-class edge map ``[N,C,H,W]`` float: pixel i is an edge of class c when y_i = c and a valid pixel of
    another class lies in its 3x3 neighbourhood (ignored pixels: class C, never edges, never 'other')."""
    oh = one_hot(target_ext, num_classes, torch.float32)
    valid = (target_ext < num_classes).unsqueeze(1).to(torch.float32)
    other = F.max_pool2d((valid - oh).clamp_min(0), 3, stride=1, padding=1)
    return oh * other


class BlobMasks:
    """Synthetic label maps ``[batch, size, size]``: argmax over classes of smooth random fields (bilinear
    upsampling of Gaussian noise on a coarse grid of 3 to 12 cells), with an ignored rectangle in some maps."""

    def __init__(self, num_classes: int, size: int = 32, batch_size: int = 8, ignore_index: int = 255) -> None:
        self.num_classes, self.size, self.batch_size, self.ignore_index = num_classes, size, batch_size, ignore_index

    @property
    def fingerprint(self) -> str:
        return f"blobs-v1-c{self.num_classes}-s{self.size}-b{self.batch_size}-i{self.ignore_index}"

    def __call__(self, gen: torch.Generator) -> Tensor:
        b, s = self.batch_size, self.size
        cells = int(torch.randint(3, 13, (1,), generator=gen))
        noise = torch.randn(b, self.num_classes, cells, cells, generator=gen)
        masks = F.interpolate(noise, size=(s, s), mode="bilinear", align_corners=False).argmax(1)
        for n in range(b):
            if float(torch.rand((), generator=gen)) < 0.3:
                y0, x0 = (int(v) for v in torch.randint(0, s - 4, (2,), generator=gen))
                hh, ww = (int(v) for v in torch.randint(2, max(3, s // 4), (2,), generator=gen))
                masks[n, y0:y0 + hh, x0:x0 + ww] = self.ignore_index
        return masks


class _MaskCrops:
    """Random ``crop`` x ``crop`` crops (padded with ignore when smaller) of stored label maps ``[M,H,W]``."""

    def __init__(self, masks: np.ndarray, crop: int, batch_size: int, ignore_index: int) -> None:
        self.masks, self.crop, self.batch_size, self.ignore_index = masks, crop, batch_size, ignore_index
        digest = hashlib.sha256(np.ascontiguousarray(masks).tobytes())
        digest.update(f"{masks.shape}{masks.dtype}".encode())
        self.fingerprint = f"masks-{digest.hexdigest()}-crop{crop}-b{batch_size}"

    def __call__(self, gen: torch.Generator) -> Tensor:
        m, h, w = self.masks.shape
        out = torch.full((self.batch_size, self.crop, self.crop), self.ignore_index, dtype=torch.int64)
        for n in range(self.batch_size):
            k = int(torch.randint(m, (1,), generator=gen))
            y0 = int(torch.randint(max(1, h - self.crop + 1), (1,), generator=gen))
            x0 = int(torch.randint(max(1, w - self.crop + 1), (1,), generator=gen))
            patch = torch.from_numpy(self.masks[k, y0:y0 + self.crop, x0:x0 + self.crop].astype(np.int64))
            out[n, :patch.shape[0], :patch.shape[1]] = patch
        return out


def _as_sampler(masks_or_generator, num_classes: int, crop: int, batch_size: int, ignore_index: int):
    if masks_or_generator is None:
        return BlobMasks(num_classes, crop, batch_size, ignore_index)
    if callable(masks_or_generator) and not isinstance(masks_or_generator, (Tensor, np.ndarray)):
        return masks_or_generator
    if isinstance(masks_or_generator, Tensor):
        arr = masks_or_generator.detach().cpu().numpy()
    else:
        arr = np.stack([np.asarray(m.cpu() if isinstance(m, Tensor) else m) for m in masks_or_generator]) \
            if not isinstance(masks_or_generator, np.ndarray) else masks_or_generator
    if arr.ndim != 3 or arr.dtype.kind not in "iu":
        raise ValueError(f"masks must be integer label maps [M, H, W], got shape {arr.shape} dtype {arr.dtype}")
    bad = (arr != ignore_index) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        raise ValueError(f"masks hold labels outside [0, {num_classes}) other than ignore_index={ignore_index}")
    return _MaskCrops(arr, crop, batch_size, ignore_index)


def _save(path: Path, net: EdgeNet, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)


def load_edge_net(path: str | os.PathLike, num_classes: int | None = None) -> EdgeNet:
    """An ``EdgeNet`` saved by ``train_edge_net`` (frozen, on the CPU); checks its number of classes."""
    blob = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    meta = blob["meta"]
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise ValueError(f"edge net {path} was trained for {meta['num_classes']} classes, need {num_classes}")
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the global RNG as it was
        net = EdgeNet(meta["num_classes"], meta["widths"])
    net.load_state_dict(blob["state_dict"])
    return net.requires_grad_(False).eval()


def train_edge_net(num_classes: int, masks_or_generator=None, steps: int = 200, *, ignore_index: int = 255,
                   widths: Sequence[int] = DEFAULT_WIDTHS, batch_size: int = 8, crop: int = 32,
                   lr: float = 5e-3, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                   use_cache: bool = True, threads: int | None = 1) -> tuple[EdgeNet, Path | None]:
    """Train (or load from the cache) the edge network; returns (frozen net on the CPU, cache file or None).

    ``masks_or_generator``: integer label maps ``[M,H,W]`` (tensor, array or sequence of 2-D maps; random
    ``crop`` x ``crop`` crops are drawn), a callable ``(torch.Generator) -> LongTensor[B,H,W]`` (cached only
    when it has a ``fingerprint`` attribute), or None for synthetic ``BlobMasks``.
    Training: Adam(``lr``), ``steps`` batches, per-class BCE on ``edge_targets`` with positives weighted by
    #negatives/#positives of the batch, ignored pixels excluded and fed as all-zero one-hot columns.
    The global RNG is left untouched (own generator, forked RNG for the initialisation). Training runs on
    the CPU with ``threads`` intra-op threads (restored afterwards; None keeps torch's setting): the net is
    small, and one thread is much faster than several on a busy machine.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    sampler = _as_sampler(masks_or_generator, num_classes, crop, batch_size, ignore_index)
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive ints, got {widths!r}")
    fingerprint = getattr(sampler, "fingerprint", None)
    meta = {"version": CACHE_VERSION, "num_classes": int(num_classes), "widths": list(widths), "steps": steps,
            "batch_size": batch_size, "crop": crop, "lr": lr, "seed": seed, "ignore_index": ignore_index,
            "data": fingerprint}
    path = None
    if use_cache and fingerprint is not None:
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = path / f"edge_net_c{num_classes}_{key}.pt"
        if path.is_file():
            try:
                return load_edge_net(path, num_classes), path
            except Exception as err:  # a corrupt or foreign file: retrain and overwrite
                log.warning("ignoring unreadable SEMEDA edge net cache %s (%s)", path, err)

    log.info("training SEMEDA edge net: %d classes, %d steps, data %s", num_classes, steps, fingerprint)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        net = _fit(sampler, num_classes, widths, steps, lr, seed, ignore_index)
    finally:
        torch.set_num_threads(old_threads)
    if path is not None:
        try:
            _save(path, net, meta)
        except OSError as err:
            log.warning("could not cache the SEMEDA edge net at %s (%s)", path, err)
            path = None
    return net, path


def _fit(sampler: Callable[[torch.Generator], Tensor], num_classes: int, widths: tuple[int, ...], steps: int,
         lr: float, seed: int, ignore_index: int) -> EdgeNet:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EdgeNet(num_classes, widths)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        t_ext = extended_target(sampler(gen), num_classes, ignore_index)
        edges = edge_targets(t_ext, num_classes)
        valid = (t_ext < num_classes).unsqueeze(1).to(torch.float32).expand_as(edges)
        pos = (edges * valid).sum()
        pos_weight = ((valid.sum() - pos) / pos.clamp_min(1.0)).clamp(1.0, 100.0)
        logits = net(one_hot(t_ext, num_classes, torch.float32))
        bce = F.binary_cross_entropy_with_logits(logits, edges, weight=valid, pos_weight=pos_weight,
                                                 reduction="sum") / valid.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        bce.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.requires_grad_(False).eval()

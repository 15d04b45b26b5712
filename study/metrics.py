"""Confusion-matrix metrics of the study (ptsemseg-style ``runningScore``, computed on device).

One matrix ``M`` (int64, ``[C, C]``, rows = ground truth, columns = prediction) is accumulated over
an evaluation. With ``TP_c = M[c, c]``, ``GT_c = sum_j M[c, j]`` and ``P_c = sum_i M[i, c]``:

- ``iou_c = TP_c / (GT_c + P_c - TP_c)``
- ``recall_c = TP_c / GT_c`` (the study's "class accuracy")
- ``precision_c = TP_c / P_c``
- ``f1_c = 2 TP_c / (GT_c + P_c)``

each NaN where its denominator is 0 (0/0: the class neither occurs nor is predicted, or for recall
does not occur, for precision is never predicted). ``miou``, ``macc``, ``mprec`` are the nanmeans of
``iou``, ``recall``, ``precision`` (undefined classes drop out), ``pixel_acc = sum_c TP_c / sum M``
and ``fwiou = sum_{c: GT_c > 0} (GT_c / sum M) * iou_c``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

__all__ = ["ConfusionMatrix"]

# Pixels per counting step on CPU (~8 numpy/torch calls each). Large enough that the counting threads
# seldom hand the GIL over (at 2^15 two threads were no faster than one: 3.0 vs 2.9 ns/px), small
# enough for the step's int16 buffers to stay in cache. Measured on 512x1024 maps, batches of 5
# (benchmarks/README.md): 2^18 gives 2.7x the read-both-maps floor with 1 and with 2 threads.
_CPU_CHUNK = 1 << 18
_MAX_INDEX_BINS = 1 << 16  # fast CPU path only when the index t*C + p fits int32 bins of this count


class ConfusionMatrix:
    """Running confusion matrix over integer label maps.

    ``update(pred, target)`` takes predicted and ground-truth class ids of the same shape (any
    shape, e.g. ``[N, H, W]``, any integer dtype, any device) and adds their joint counts
    ``M[t, p] += #{pixels with target t and prediction p}`` on the tensors' device. Pixels whose
    target equals ``ignore_index`` or lies outside ``[0, C)``, and pixels whose prediction lies
    outside ``[0, C)``, are not counted. Counts are exact (int64).

    On CUDA (any non-CPU device) the counts are accumulated on the device without a host
    synchronisation; on CPU, :func:`_counts_cpu` counts in parallel chunks.
    The matrix lives on ``device`` if given, otherwise on the device of the first ``update``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device = torch.device(device) if device is not None else None
        self._mat: torch.Tensor | None = None

    # ------------------------------------------------------------------ accumulation
    @property
    def device(self) -> torch.device:
        if self._mat is not None:
            return self._mat.device
        return self._device if self._device is not None else torch.device("cpu")

    @property
    def mat(self) -> torch.Tensor:
        """The accumulated matrix, int64 ``[C, C]``, rows = ground truth, columns = prediction."""
        if self._mat is None:
            self._mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        return self._mat

    def reset(self) -> None:
        """Zero the matrix (keeps its device)."""
        if self._mat is not None:
            self._mat.zero_()

    def counts(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The ``[C, C]`` confusion counts of one ``(pred, target)`` pair, on their device."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target, device=pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point() or pred.is_complex() or target.is_complex():
            raise TypeError(f"pred and target must hold integer class ids, got {pred.dtype} and {target.dtype}")
        p = pred.reshape(-1)
        t = target.reshape(-1)
        if p.device.type == "cpu":
            return _counts_cpu(p, t, self.num_classes, self.ignore_index)
        return _counts_device(p, t, self.num_classes, self.ignore_index)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the counts of ``pred`` vs ``target`` (same shape, integer class ids)."""
        counts = self.counts(pred, target)
        if self._mat is None and self._device is None:
            self._mat = counts.clone()
        else:
            self.mat.add_(counts.to(self.mat.device, non_blocking=True))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix in place; returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        if other._mat is not None:
            self.mat.add_(other._mat.to(self.mat.device))
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "mat": self.mat.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mat = torch.as_tensor(state["mat"], dtype=torch.int64)
        if tuple(mat.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"state holds a {tuple(mat.shape)} matrix, expected {(self.num_classes, self.num_classes)}")
        self.ignore_index = int(state.get("ignore_index", self.ignore_index))
        self._mat = mat.to(self.device).clone()

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, Any]:
        """Per-class ``iou, recall, precision, f1`` (float64 arrays, NaN where 0/0), per-class
        ground-truth ``pixels`` (int64), and floats ``miou, macc, mprec, pixel_acc, fwiou``."""
        return metrics_from_matrix(self.mat.detach().cpu().numpy())


# ---------------------------------------------------------------------------------------- counting


def _counts_device(p: torch.Tensor, t: torch.Tensor, c: int, ignore_index: int) -> torch.Tensor:
    """Counts on any device without a host synchronisation (no ``.item()``, no data-dependent shape).

    Invalid pixels get the index ``C*C`` (an overflow bin that is dropped), valid ones ``t*C + p``;
    the ``C*C + 1`` bins are filled by ``scatter_add_`` into a fixed-size int64 tensor (exact in any
    order). ``torch.bincount`` is avoided because on CUDA it reads the maximum back to the host.
    """
    p, t = p.long(), t.long()
    valid = (t >= 0) & (t < c) & (t != ignore_index) & (p >= 0) & (p < c)
    idx = torch.where(valid, t * c + p, c * c)
    bins = torch.zeros(c * c + 1, dtype=torch.int64, device=p.device)
    bins.scatter_add_(0, idx, torch.ones(1, dtype=torch.int64, device=p.device).expand_as(idx))
    return bins[: c * c].reshape(c, c)


def _counts_cpu(p: torch.Tensor, t: torch.Tensor, c: int, ignore_index: int) -> torch.Tensor:
    """CPU counts: the pixels are split into one contiguous part per torch thread
    (``torch.get_num_threads()``), each counted by :func:`_count_part` in its own thread (the numpy
    and torch kernels used release the GIL); the parts' bins are summed. Same counts as
    :func:`_counts_device`.
    """
    t_max = max(c - 1, ignore_index)  # largest target id the fast path accepts (ignore 255 included)
    bins = (t_max + 1) * c
    if p.dtype == torch.bool or t.dtype == torch.bool or bins > _MAX_INDEX_BINS:
        return _counts_device(p, t, c, ignore_index)
    pn = p.contiguous().numpy()
    tn = t.contiguous().numpy()
    n = pn.size
    workers = max(1, min(torch.get_num_threads(), -(-n // _CPU_CHUNK)))
    cuts = [n * i // workers for i in range(workers + 1)]
    parts = [(pn[a:b], tn[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    if workers == 1:
        flat = _count_part(*parts[0], c, t_max)
    else:
        flat = sum(_pool(workers).map(lambda part: _count_part(*part, c, t_max), parts))
    out = flat[: c * c].reshape(c, c)
    if 0 <= ignore_index < c:  # targets equal to an in-range ignore index all sit in its row
        out[ignore_index] = 0
    return out


def _count_part(pn: np.ndarray, tn: np.ndarray, c: int, t_max: int) -> torch.Tensor:
    """Bins ``t*C + p`` (length ``(t_max + 1) * C``) of one part, chunk by chunk.

    A chunk whose predictions all lie in ``[0, C)`` and targets in ``[0, t_max]`` (one unsigned max
    each: negative ids read as huge unsigned numbers) is narrowed to int16/int32, turned into
    ``t*C + p`` in place and counted by ``torch.bincount``; targets ``>= C`` land in bins
    ``>= C*C``, which the caller drops. Any other chunk is counted by :func:`_counts_device`.
    """
    bins = (t_max + 1) * c
    narrow = np.int16 if bins <= np.iinfo(np.int16).max + 1 else np.int32
    out = torch.zeros(bins, dtype=torch.int64)
    size = min(pn.size, _CPU_CHUNK)
    idx, pbuf = np.empty(size, dtype=narrow), np.empty(size, dtype=narrow)
    idx_t = torch.from_numpy(idx)
    pu, tu = _unsigned(pn), _unsigned(tn)
    for start in range(0, pn.size, _CPU_CHUNK):
        stop = min(start + _CPU_CHUNK, pn.size)
        if pu[start:stop].max() >= c or tu[start:stop].max() > t_max:
            chunk = _counts_device(torch.from_numpy(pn[start:stop]), torch.from_numpy(tn[start:stop]), c, -1)
            out[: c * c] += chunk.reshape(-1)
            continue
        k = stop - start
        np.copyto(idx[:k], tn[start:stop], casting="unsafe")
        np.copyto(pbuf[:k], pn[start:stop], casting="unsafe")
        np.multiply(idx[:k], c, out=idx[:k])
        np.add(idx[:k], pbuf[:k], out=idx[:k])
        out += torch.bincount(idx_t[:k], minlength=bins)
    return out


def _unsigned(a: np.ndarray) -> np.ndarray:
    """``a`` viewed as unsigned integers of its width (negative ids become values ``>= 2**(bits-1)``)."""
    return a if a.dtype.kind == "u" else a.view(np.dtype(f"u{a.dtype.itemsize}"))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide thread pool with at least ``workers`` threads (re-created after a fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="confusion")
        return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def metrics_from_matrix(mat: np.ndarray) -> dict[str, Any]:
    """The metrics of the module docstring from a ``[C, C]`` count matrix (rows = ground truth)."""
    m = np.asarray(mat, dtype=np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pr = m.sum(axis=0)
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = _div(tp, gt + pr - tp)
        recall = _div(tp, gt)
        precision = _div(tp, pr)
        f1 = _div(2.0 * tp, gt + pr)
        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        present = gt > 0
        fwiou = float(np.sum(gt[present] / total * iou[present])) if total > 0 else float("nan")
    return {
        "iou": iou,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "pixels": np.asarray(mat).sum(axis=1).astype(np.int64),
        "miou": _nanmean(iou),
        "macc": _nanmean(recall),
        "mprec": _nanmean(precision),
        "pixel_acc": pixel_acc,
        "fwiou": fwiou,
    }


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")

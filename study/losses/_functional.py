"""Shared math of the loss library.

Conventions used by every loss:
- ``logits`` is ``[N, C, H, W]``, ``target`` is ``[N, H, W]`` int64 with values in ``[0, C)`` or
  ``ignore_index``. A pixel is *valid* when its target is not ``ignore_index``.
- Losses run in float32 (float64 is kept, for gradcheck); half/bfloat16 logits are upcast and autocast
  is switched off inside (:class:`SegLoss`).
- Nothing here calls ``.item()`` or indexes with a boolean mask: per-class counts come from one
  counting pass over an index tensor in which ignored pixels point to an overflow bin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def as_float(logits: Tensor) -> Tensor:
    """Logits in float32, or float64 when they already are float64."""
    if logits.dtype in (torch.float32, torch.float64):
        return logits
    return logits.float()


def check_inputs(logits: Tensor, target: Tensor, num_classes: int) -> None:
    """Shape checks only (free: no device synchronisation)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be [N, C, H, W], got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels but the loss was built for "
                         f"num_classes={num_classes}")
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target must be [N, H, W] = {(n, h, w)}, got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")


def extended_target(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """int64 target where ignored pixels are mapped to ``num_classes`` (the overflow bin)."""
    target = target.long()
    return torch.where(target == ignore_index, torch.full_like(target, num_classes), target)


def safe_target(target_ext: Tensor, num_classes: int) -> Tensor:
    """Extended target with the overflow value replaced by 0, safe for ``gather``."""
    return torch.where(target_ext == num_classes, torch.zeros_like(target_ext), target_ext)


def count_bins(index: Tensor, num_bins: int) -> Tensor:
    """int64 histogram of ``index`` (values in ``[0, num_bins)``) without host synchronisation.

    ``torch.bincount`` on CPU; on accelerators ``bincount`` reads the maximum back to the host, so a
    ``scatter_add_`` into a fixed-size histogram is used instead.
    """
    index = index.reshape(-1)
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=num_bins)
    return scatter_count(index, num_bins)


def scatter_count(index: Tensor, num_bins: int) -> Tensor:
    """Histogram by ``scatter_add_`` into ``num_bins`` int64 bins (the accelerator path of ``count_bins``)."""
    index = index.reshape(-1)
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.shape)
    return torch.zeros(num_bins, dtype=torch.int64, device=index.device).scatter_add_(0, index, ones)


def class_pixel_counts(target_ext: Tensor, num_classes: int) -> Tensor:
    """GT_c = number of valid pixels of class c, int64 ``[C]``."""
    return count_bins(target_ext, num_classes + 1)[:num_classes]


def one_hot(target_ext: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[N, C, H, W]`` one-hot of the target; ignored pixels are all-zero columns."""
    oh = F.one_hot(target_ext, num_classes + 1)[..., :num_classes]
    return oh.permute(0, 3, 1, 2).to(dtype)


def zero_loss(logits: Tensor) -> Tensor:
    """A 0 that stays attached to the graph (``logits.sum() * 0``)."""
    return logits.sum() * 0


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(values) / sum(weights), and a graph-attached 0 when sum(weights) == 0 (no NaN, no sync)."""
    den = weights.sum()
    return values.sum() / torch.where(den > 0, den, torch.ones_like(den))


class _CrossEntropyWithMax(torch.autograd.Function):
    """Per-pixel CE plus, from the same pass, the class-wise max and the target logit.

    forward:  nll_n = logsumexp_c x_nc - x_{n,y_n};  x_max_n = max_c x_nc;  x_y_n = x_{n,y_n}
    backward: d nll_n / d x_nc = softmax(x_n)_c - [c = y_n]
    (``x_max`` and ``x_y`` are returned without gradient.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor):  # type: ignore[override]
        x_max = x.amax(dim=1, keepdim=True)
        e = torch.sub(x, x_max).exp_()
        s = e.sum(dim=1, keepdim=True)
        x_y = x.gather(1, target.unsqueeze(1))
        nll = (s.log() + x_max - x_y).squeeze(1)
        ctx.save_for_backward(e, s, target)
        x_max, x_y = x_max.squeeze(1), x_y.squeeze(1)
        ctx.mark_non_differentiable(x_max, x_y)
        return nll, x_max, x_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _gmax: Tensor, _gy: Tensor):  # type: ignore[override]
        e, s, target = ctx.saved_tensors
        g = grad_nll.unsqueeze(1)
        grad = e * (g / s)
        grad.scatter_add_(1, target.unsqueeze(1), -g)
        return grad, None


def cross_entropy_with_max(x: Tensor, target_safe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(nll ``[N,H,W]``, x_max ``[N,H,W]``, x_y ``[N,H,W]``) in one pass over the logits.

    ``target_safe`` must hold valid class indices everywhere (ignored pixels mapped to any class);
    callers zero the ignored pixels' contribution through their per-pixel weights.
    """
    return _CrossEntropyWithMax.apply(x, target_safe)


def pixel_cross_entropy(x: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Per-pixel CE ``[N,H,W]``, 0 (and no gradient) at ignored pixels.

    Same values as ``F.cross_entropy(reduction='none', ignore_index=...)``, through
    :func:`cross_entropy_with_max` (one pass, cheaper backward than the native op on CPU).
    """
    num_classes = x.shape[1]
    t_ext = extended_target(target, num_classes, ignore_index)
    nll = cross_entropy_with_max(x, safe_target(t_ext, num_classes))[0]
    return nll * (t_ext < num_classes).to(nll.dtype)


def recall_counts(x_max: Tensor, x_y: Tensor, target_ext: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(FN_c, GT_c) as int64 ``[C]`` over valid pixels, in one counting pass.

    A valid pixel is a false negative exactly when ``max_c x_c > x_y`` (i.e. argmax != y), except for
    exact ties between the target logit and another class's logit, which count as correct here
    while ``argmax`` would count them wrong when the other class has the lower index.
    Bins: ``[0, C]`` correct pixels (C = overflow for ignored), ``[C+1, 2C+1]`` false negatives.
    """
    fn = x_max > x_y
    index = target_ext + fn.long() * (num_classes + 1)
    counts = count_bins(index, 2 * (num_classes + 1)).view(2, num_classes + 1)[:, :num_classes]
    return counts[1], counts[0] + counts[1]


class SegLoss(nn.Module):
    """Base of every loss: checks shapes, upcasts to float32 and disables autocast, then calls
    ``self.compute(x, target)`` with ``x`` float32 (float64 kept) ``[N,C,H,W]``."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class index in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_inputs(logits, target, self.num_classes)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.compute(as_float(logits), target)

    def compute(self, x: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"

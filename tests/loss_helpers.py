"""Plain helpers shared by the loss tests: random batches and per-pixel loops (no library code)."""

from __future__ import annotations

import torch

IGNORE = 255


def random_batch(shape, seed, absent=(1,), ignore_frac=0.25):
    """float64 logits (requires grad) and a target with ignored pixels; classes in ``absent`` never occur."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    keep = torch.tensor([k for k in range(c) if k not in absent])
    t = keep[torch.randint(len(keep), (n, h, w), generator=g)]
    t[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return x, t


def pixels(t):
    """(image, row, column, class) of every valid pixel, in order."""
    n, h, w = t.shape
    for a in range(n):
        for i in range(h):
            for j in range(w):
                if int(t[a, i, j]) != IGNORE:
                    yield a, i, j, int(t[a, i, j])


def ce_px(x, a, i, j, y):
    """Cross entropy of one pixel: logsumexp of its logits minus the target logit."""
    return torch.logsumexp(x[a, :, i, j], 0) - x[a, y, i, j]

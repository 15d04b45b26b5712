"""Determinism helpers: the batch order, per-sample augmentation seeds and RNG state of a run.

The batches of iteration ``k`` and the augmentation of each sample in it are pure functions of
(run seed, k), so a run resumed at any iteration sees exactly what an uninterrupted run would.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, iteration: int, position: int) -> int:
    """Seed of the augmentation of one sample: a pure function of (run seed, iteration, position)."""
    return (seed * 1_000_003 + iteration * 9_973 + position * 101 + 17) % (2**31 - 1)


class IterationBatchSampler(Sampler):
    """Batches ``[(index, aug_seed), ...]`` for iterations ``start..total-1``.

    The index stream is a concatenation of per-epoch permutations drawn from ``seed`` and the epoch
    number, so batch ``k`` depends only on (seed, k): resuming at any iteration reproduces the order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int):
        self.n, self.batch_size, self.seed, self.start, self.total = n, batch_size, seed, start, total

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        pos = self.start * self.batch_size
        epoch, offset = divmod(pos, self.n)
        order = self._epoch(epoch)
        for it in range(self.start, self.total):
            batch = []
            for p in range(self.batch_size):
                if offset == self.n:
                    epoch, offset = epoch + 1, 0
                    order = self._epoch(epoch)
                batch.append((order[offset], sample_seed(self.seed, it, p)))
                offset += 1
            yield batch


class SeededSamples(Dataset):
    """Wraps a data set so that item ``(index, seed)`` is drawn with all RNGs seeded by ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])

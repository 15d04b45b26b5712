"""Data loading vs the model's appetite, at the demo size (see ``benchmarks/_demo.py``).

Loader: ``study.data.build_datasets(spec.data, ...)`` and the trainer's own DataLoader set-up
(``SeededSamples`` + ``IterationBatchSampler``, ``train.workers`` workers): time to produce one
training batch. Model: one training step of the demo model on a batch (forward, loss, backward,
Adam step). Rounds alternate a block of batches and a block of steps; ratio = step time / batch
time per round (target: the loader is >= 5x faster than the model consumes).
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from benchmarks._common import Row, Stats, interleaved, paired_ratio
from benchmarks._demo import demo_spec
from study.data import build_datasets
from study.losses import build_loss
from study.models import build_model
from study.optim import build_optimizer
from study.train import IterationBatchSampler, SeededSamples

NAME = "data_loading"


def run(quick: bool = False) -> list[Row]:
    spec, source = demo_spec()
    t0 = time.perf_counter()
    bundle = build_datasets(spec.data, spec.data.split_seed)
    first_build = time.perf_counter() - t0
    bs = spec.train.batch_size
    n_batches, n_steps = (4, 2) if quick else (10, 5)
    rounds = 3 if quick else 6
    total = 10_000
    loader = DataLoader(SeededSamples(bundle.train),
                        batch_sampler=IterationBatchSampler(len(bundle.train), bs, spec.seed, 0, total),
                        num_workers=spec.train.workers)
    stream = iter(loader)
    batch = next(stream)

    model = build_model(spec.model.arch, spec.model.backbone, bundle.num_classes, spec.model.output_stride,
                        spec.model.pretrained)
    model.train()
    loss_fn = build_loss(spec.loss.name, bundle.num_classes, ignore_index=bundle.ignore_index,
                         **dict(spec.loss.params))
    opt = build_optimizer(spec.train.optimizer, model.parameters())

    def produce() -> None:
        for _ in range(n_batches):
            next(stream)

    def consume() -> None:
        images, targets = batch
        for _ in range(n_steps):
            loss = loss_fn(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times = interleaved({"loader": produce, "step": consume}, repeats=rounds, warmup=1)
    per_batch = [x / n_batches for x in times["loader"]]
    per_step = [x / n_steps for x in times["step"]]
    r = paired_ratio(per_step, per_batch)
    size = "x".join(map(str, (spec.data.texdigits.height, spec.data.texdigits.width)))
    what = (f"texdigits {size} batch {bs}, {spec.train.workers} workers; model {spec.model.arch}/"
            f"{spec.model.backbone} + {spec.loss.name} [{source}]")
    return [Row(f"data loading: one batch vs one training step ({what})",
                Stats.of(per_batch).fmt("s/batch"), Stats.of(per_step).fmt("s/step"),
                f"{r.median:.1f}x (IQR {r.q1:.1f}-{r.q3:.1f})", ">= 5x", "yes" if r.median >= 5 else "NO"),
            Row("data: build_datasets (first call of this process; texdigits cached on disk after the first ever)",
                f"{first_build:.2f} s")]

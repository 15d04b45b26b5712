"""Harness overhead: a ~60 s CPU run through ``study.train.train`` vs the same loop bare.

Harness: ``train(spec, fresh=True)`` on the demo spec (``benchmarks/_demo.py``) with a real sqlite
MLflow store and checkpoints in a fresh temporary folder per round: store creation, run, params,
tags, batched metrics, checkpoints every ``eval_interval``, evaluations, the final test evaluation
and its artifacts. Bare: the same data set, sampler, model initialisation, loss, optimizer,
schedule and number of iterations, and nothing else. ``train.iterations`` is set so the bare loop
takes ~60 s (``--quick``: ~10 s), measured from a few calibration steps. Rounds alternate
harness and bare.

Rows: the overhead without the evaluation time the trainer reports (evaluation is work the bare
loop skips, not harness cost; target <= 5 %), the overhead including it, and process start-up
(``python -m study --help``, ``python -c "import study.train"``, against ``import torch``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks._common import ROOT_ENV, Row, Stats, interleaved, paired_ratio
from benchmarks._demo import ROOT, demo_spec
from study.data import build_datasets
from study.losses import LOSSES, build_loss
from study.models import build_model
from study.spec import RunSpec
from study.optim import build_optimizer, build_scheduler
from study.train import (IterationBatchSampler, SeededSamples, seed_everything,
                         train)

NAME = "harness"


def bare_loop(spec: RunSpec, iterations: int | None = None) -> float:
    """The training loop with nothing around it; returns seconds per step of the last half."""
    torch.set_num_threads(spec.train.threads or torch.get_num_threads())
    bundle = build_datasets(spec.data, spec.data.split_seed)
    seed_everything(spec.seed)
    model = build_model(spec.model.arch, spec.model.backbone, bundle.num_classes, spec.model.output_stride,
                        spec.model.pretrained)
    params = dict(spec.loss.params)
    if "class_counts" in LOSSES[spec.loss.name].needs:
        params["class_counts"] = [int(c) for c in bundle.class_counts]
    loss_fn = build_loss(spec.loss.name, bundle.num_classes, ignore_index=bundle.ignore_index, **params)
    optimizer = build_optimizer(spec.train.optimizer, model.parameters())
    scheduler = build_scheduler(spec.train, optimizer)
    total = iterations or spec.train.iterations
    loader = DataLoader(SeededSamples(bundle.train),
                        batch_sampler=IterationBatchSampler(len(bundle.train), spec.train.batch_size, spec.seed,
                                                            0, total),
                        num_workers=spec.train.workers, generator=torch.Generator().manual_seed(spec.seed))
    model.train()
    t_half = None
    for i, (images, targets) in enumerate(loader):
        if i == total // 2:
            t_half = time.perf_counter()
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - t_half) / (total - total // 2) if t_half else float("nan")


def _process_start(quick: bool) -> list[Row]:
    py = sys.executable
    cmds = {
        "python -m study --help": [py, "-m", "study", "--help"],
        'python -c "import study.train"': [py, "-c", "import study.train"],
        'python -c "import torch"': [py, "-c", "import torch"],
    }

    def runner(cmd):
        return lambda: subprocess.run(cmd, cwd=ROOT, env=ROOT_ENV(), check=True, capture_output=True)

    times = interleaved({k: runner(v) for k, v in cmds.items()}, repeats=3 if quick else 5, warmup=1)
    base = 'python -c "import torch"'
    rows = []
    for name in list(cmds)[:2]:
        r = paired_ratio(times[name], times[base])
        rows.append(Row(f"process start: {name}", Stats.of(times[name]).fmt(), f"{Stats.of(times[base]).fmt()} "
                        "(import torch)", f"{r.median:.2f}x", "report", "-"))
    return rows


def run(quick: bool = False) -> list[Row]:
    target_s = 10.0 if quick else 60.0
    rounds = 1 if quick else 2
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    try:
        calib_spec, source = demo_spec(tmp_root / "calib")
        step = bare_loop(calib_spec, iterations=8 if quick else 16)  # also builds/caches the data set
        iterations = max(10, int(target_s / step))
        base_spec, _ = demo_spec(tmp_root / "calib", iterations=iterations)
        evals: list[float] = []
        breakdown: list[dict[str, float]] = []
        counter = [0]

        def harness() -> None:
            counter[0] += 1
            spec, _ = demo_spec(tmp_root / f"h{counter[0]}", iterations=iterations)
            result = train(spec, fresh=True, progress=False)
            evals.append(result.timings.get("eval", 0.0))
            breakdown.append(result.timings)

        def bare() -> None:
            bare_loop(base_spec)

        times = interleaved({"harness": harness, "bare": bare}, repeats=rounds, warmup=0)
        excl = [h - e for h, e in zip(times["harness"], evals)]
        r_excl = paired_ratio(excl, times["bare"])
        r_incl = paired_ratio(times["harness"], times["bare"])
        s = base_spec.train
        what = (f"{iterations} it of {base_spec.model.arch}/{base_spec.model.backbone} + {base_spec.loss.name}, "
                f"eval/ckpt every {s.eval_interval}, log every {s.log_interval} [{source}]")
        pct = lambda r: f"{(r - 1) * 100:+.1f} %"  # noqa: E731
        rows = [
            Row(f"harness overhead excl. evaluation ({what})", Stats.of(excl).fmt(), Stats.of(times["bare"]).fmt(),
                f"{pct(r_excl.median)} (rounds: {', '.join(pct(a / b) for a, b in zip(excl, times['bare']))})",
                "<= +5 %", "yes" if r_excl.median <= 1.05 else "NO"),
            Row(f"harness incl. evaluation ({Stats.of(evals).median:.1f} s eval)", Stats.of(times["harness"]).fmt(),
                Stats.of(times["bare"]).fmt(), pct(r_incl.median), "report", "-"),
            Row("harness time split (train() timings, last round)",
                ", ".join(f"{k} {v:.1f} s" for k, v in breakdown[-1].items())),
        ]
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return rows + _process_start(quick)

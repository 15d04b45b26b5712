"""The training loop: iteration-based, evaluated with the metric core, checkpointed, resumable.

``train(spec)`` trains one run spec and leaves one complete MLflow run (docs/architecture.md lists what
is logged). Resuming: if ``{checkpoint_root}/{experiment}/{spec_hash}/last.pt`` exists, training
continues from it in the same MLflow run; model, optimizer, scheduler, loss buffers (EMA weights),
RNG states and the iteration are restored, and the batch order and augmentation of every iteration
are a function of (seed, iteration), so an interrupted and resumed CPU run ends with the same metrics
as an uninterrupted one.

Host synchronisation happens only every ``log_interval`` iterations (one transfer of the buffered
losses and weights), at evaluations and at checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from study import checkpoint as ckpt
from study import tracking
from study.spec import RunSpec, flatten, loss_label, run_name, spec_hash, to_dict, to_yaml


class TrainingFailed(RuntimeError):
    """The run cannot continue (non-finite loss, bad data); the reason is tagged on the MLflow run."""


@dataclasses.dataclass
class RunResult:
    run_id: str
    spec_hash: str
    iteration: int
    metrics: dict[str, float]
    resumed: bool
    timings: dict[str, float]


# ----------------------------------------------------------------------------- determinism


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


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


# ----------------------------------------------------------------------------- building blocks


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingFailed("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    o = spec.train.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(spec: RunSpec, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """constant: lr; poly: lr * (1 - it / iterations) ** poly_power."""
    total, power = spec.train.iterations, spec.train.poly_power
    if spec.train.schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / total) ** power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)


def metric_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@torch.no_grad()
def evaluate(model, loader, num_classes: int, ignore_index: int, device, amp: bool):
    """Run ``model`` over ``loader``; return the filled ConfusionMatrix."""
    from study.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    model.eval()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        cm.update(logits.argmax(1), targets)
    model.train()
    return cm


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def eval_metrics(prefix: str, result: dict, class_names: list[str]) -> dict[str, float]:
    """Flatten ConfusionMatrix.compute() into MLflow metric names (NaN classes are left out)."""
    out = {f"{prefix}/{k}": float(result[k]) for k in ("miou", "macc", "mprec", "pixel_acc", "fwiou")}
    for kind in ("iou", "recall", "precision"):
        for name, value in zip(class_names, result[kind]):
            if not math.isnan(value):
                out[f"{prefix}/{kind}/{metric_key(name)}"] = float(value)
    return {k: v for k, v in out.items() if not math.isnan(v)}


# ----------------------------------------------------------------------------- the loop


def checkpoint_dir(spec: RunSpec) -> Path:
    return Path(spec.tracking.checkpoint_root).resolve() / spec.tracking.experiment / spec_hash(spec)


def train(
    spec: RunSpec,
    *,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    grid: str | None = None,
    fresh: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train ``spec`` to ``train.iterations`` (or stop early after ``stop_after`` iterations, for tests).

    Returns the run id and final test metrics. Raises TrainingFailed after marking the run FAILED.
    """
    from study.data import build_datasets
    from study.losses import NEEDS_CLASS_COUNTS, RECALL_FAMILY, build_loss
    from study.models import build_model

    timings = {"setup": 0.0, "data": 0.0, "step": 0.0, "eval": 0.0, "logging": 0.0, "checkpoint": 0.0}
    t0 = time.perf_counter()
    h = spec_hash(spec)
    uri = tracking.resolve_uri(spec.tracking.uri)
    if experiment_id is None:
        uri, experiment_id = tracking.prepare(uri, spec.tracking.experiment)
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    state: dict | None = None
    try:  # errors before training starts still leave a FAILED run with the reason
        device = pick_device(spec.train.device)
        bundle = build_datasets(spec.data, spec.data.split_seed)
        class_names = list(bundle.class_names)
        C = bundle.num_classes
        seed_everything(spec.seed)  # after the data: a cached and a fresh data set must give the same model
        model = build_model(spec.model.arch, spec.model.backbone, C, spec.model.output_stride, spec.model.pretrained)
        model.to(device)
        params = dict(spec.loss.params)
        if spec.loss.name in NEEDS_CLASS_COUNTS:
            params["class_counts"] = [int(c) for c in bundle.class_counts]
        loss_fn = build_loss(spec.loss.name, C, ignore_index=bundle.ignore_index, **params).to(device)
        optimizer = build_optimizer(spec, model.parameters())
        scheduler = build_scheduler(spec, optimizer)

        folder = checkpoint_dir(spec)
        if fresh and folder.exists():
            for f in folder.iterdir():
                f.unlink()
        state, ckpt_notes = ckpt.load_latest(folder, map_location=device)
        start, best_miou, best_it = 0, -1.0, -1
        resumed = state is not None and state.get("spec_hash") == h
        if resumed:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            loss_fn.load_state_dict(state["loss"])
            _set_rng_state(state["rng"])
            start, best_miou, best_it = state["iteration"], state["best_miou"], state["best_iteration"]
    except Exception as err:
        _record_setup_failure(spec, uri, experiment_id, parent_run_id, grid, state, err)
        raise
    if resumed:
        logger = tracking.RunLogger(uri, state["run_id"])
        logger.reopen()
    else:
        tags = {**_spec_tags(spec, grid), "study.class_names": json.dumps(class_names), "study.iteration": 0}
        logger = tracking.RunLogger.start(uri, experiment_id, run_name(spec), tags, parent_run_id)
        if ckpt_notes:  # the run those checkpoints belonged to cannot continue: close it, pointing here
            ckpt_notes.append("no usable checkpoint: restarted from iteration 0 in this new run")
            _close_unresumable_runs(uri, experiment_id, h, logger.run_id)
        logger.log_params(flatten(to_dict(spec)))
        logger.set_tags({"study.class_counts": json.dumps([int(c) for c in bundle.class_counts])})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "spec.yaml"
            p.write_text(to_yaml(spec))
            logger.log_artifact(p)
    if ckpt_notes:
        logger.set_tags({"study.warning": " | ".join(ckpt_notes)[:4000]})

    total = spec.train.iterations
    end = total if stop_after is None else min(total, start + stop_after)
    loader = DataLoader(
        SeededSamples(bundle.train),
        batch_sampler=IterationBatchSampler(len(bundle.train), spec.train.batch_size, spec.seed, start, end),
        num_workers=spec.train.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(spec.seed),  # never draw from the global RNG (resume)
    )
    eval_bs = spec.train.eval_batch_size or spec.train.batch_size
    val_loader = DataLoader(bundle.val, batch_size=eval_bs, shuffle=False, num_workers=spec.train.workers,
                            generator=torch.Generator().manual_seed(spec.seed))
    ckpt_every = spec.train.checkpoint_interval or spec.train.eval_interval
    log_every = spec.train.log_interval
    track_weights = spec.loss.name in RECALL_FAMILY

    def save_state(it: int) -> None:
        t = time.perf_counter()
        ckpt.save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(), "rng": _rng_state(),
                "iteration": it, "best_miou": best_miou, "best_iteration": best_it,
                "run_id": logger.run_id, "spec_hash": h,
            },
            folder / "last.pt", keep_previous=True,
        )
        logger.set_tags({"study.iteration": it})
        timings["checkpoint"] += time.perf_counter() - t

    losses: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []

    def flush_logs(it: int) -> None:
        """One host transfer for the buffered losses; NaN/Inf fails the run."""
        t = time.perf_counter()
        if losses:
            values = torch.stack(losses).float().cpu().tolist()
            first = it - len(values) + 1
            bad = [first + i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                raise TrainingFailed(f"non-finite loss ({values[bad[0] - first]}) at iteration {bad[0]}")
            for i, v in enumerate(values):
                logger.log_metrics({"train/loss": v}, first + i)
            logger.log_metrics({"train/lr": scheduler.get_last_lr()[0]}, it)
            if weights:
                w = weights[-1].float().cpu().tolist()
                logger.log_metrics({f"recall_weight/{metric_key(n)}": x for n, x in zip(class_names, w)}, it)
            losses.clear()
            weights.clear()
            logger.flush()
        timings["logging"] += time.perf_counter() - t

    show = progress if progress is not None else (os.isatty(2) and "SLURM_JOB_ID" not in os.environ)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=run_name(spec), dynamic_ncols=True, mininterval=1.0)

    timings["setup"] += time.perf_counter() - t0
    it = start
    try:
        model.train()
        t_data = time.perf_counter()
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            t_step = time.perf_counter()
            timings["data"] += t_step - t_data
            with _autocast(device, spec.train.amp):
                logits = model(images)
            loss = loss_fn(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            it += 1
            losses.append(loss.detach())
            if track_weights and getattr(loss_fn, "last_weights", None) is not None:
                weights.append(loss_fn.last_weights.detach())
            timings["step"] += time.perf_counter() - t_step
            if bar is not None:
                bar.update(1)
            if it % log_every == 0 or it == end:
                flush_logs(it)
            if it % spec.train.eval_interval == 0 or it == total:
                t = time.perf_counter()
                cm = evaluate(model, val_loader, C, bundle.ignore_index, device, spec.train.amp)
                result = cm.compute()
                logger.log_metrics(eval_metrics("val", result, class_names), it)
                logger.flush()
                if result["miou"] > best_miou:
                    best_miou, best_it = float(result["miou"]), it
                    ckpt.save({"model": model.state_dict(), "iteration": it, "miou": best_miou}, folder / "best.pt")
                timings["eval"] += time.perf_counter() - t
            if it % ckpt_every == 0 or it == end:
                save_state(it)
            t_data = time.perf_counter()
        flush_logs(it)
        if bar is not None:
            bar.close()
        if it < total:  # stopped early on purpose (tests, time budget): leave the run resumable
            logger.flush()
            return RunResult(logger.run_id, h, it, {}, resumed, timings)
        t = time.perf_counter()
        metrics = _final_evaluation(spec, model, bundle, folder, device, logger, class_names, it, best_it)
        timings["eval"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        logger.set_tags({"study.iteration": it, "study.timings": json.dumps({k: round(v, 3) for k, v in timings.items()})})
        logger.finish("FINISHED")
        return RunResult(logger.run_id, h, it, metrics, resumed, timings)
    except BaseException as err:
        if bar is not None:
            bar.close()
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            logger.flush()
            logger.set_tags({"study.interrupted": f"at iteration {it}"})
            raise
        reason = f"{type(err).__name__}: {err}"
        try:
            logger.set_tags({"study.failure": reason[:4000], "study.iteration": it})
            logger.finish("FAILED")
        finally:
            if isinstance(err, TrainingFailed):
                raise
            raise TrainingFailed(reason) from err


def _spec_tags(spec: RunSpec, grid: str | None) -> dict[str, Any]:
    """The run tags that depend on the spec alone (docs/architecture.md)."""
    tags: dict[str, Any] = {
        "study.spec_hash": spec_hash(spec),
        "study.loss": loss_label(spec),
        "study.loss_name": spec.loss.name,
        "study.dataset": spec.data.name,
        "study.backbone": spec.model.backbone,
        "study.arch": spec.model.arch,
        "study.seed": spec.seed,
        "study.git_commit": tracking.git_commit(),
        "study.versions": json.dumps(tracking.library_versions()),
    }
    if grid:
        tags["study.grid"] = grid
    return tags


def _record_setup_failure(spec: RunSpec, uri: str, experiment_id: str, parent_run_id: str | None,
                          grid: str | None, state: dict | None, err: BaseException) -> None:
    """Mark the run FAILED with ``study.failure`` for an error raised before the first step (bad data,
    model, loss or checkpoint state): the resumed run when the checkpoint names one, else a new run.
    Best effort: a store error here is only warned about, the original error is re-raised by the caller."""
    import warnings

    reason = f"{type(err).__name__}: {err}"[:4000]
    try:
        run_id = state.get("run_id") if isinstance(state, dict) and state.get("spec_hash") == spec_hash(spec) else None
        if run_id:
            logger = tracking.RunLogger(uri, run_id)
        else:
            logger = tracking.RunLogger.start(uri, experiment_id, run_name(spec), _spec_tags(spec, grid), parent_run_id)
        logger.set_tags({"study.failure": reason})
        logger.finish("FAILED")
    except Exception as store_err:  # noqa: BLE001
        warnings.warn(f"could not record the failure in MLflow ({store_err}); the failure was: {reason}", stacklevel=2)


def _close_unresumable_runs(uri: str, experiment_id: str, h: str, new_run_id: str) -> None:
    """Mark RUNNING runs of spec ``h`` FAILED: their checkpoints were unusable, ``new_run_id`` restarts them."""
    for run in tracking.find_runs(uri, experiment_id, [h]).get(h, []):
        if run.info.run_id != new_run_id and run.info.status == "RUNNING":
            old = tracking.RunLogger(uri, run.info.run_id)
            old.set_tags({"study.failure": f"checkpoints unusable; restarted from scratch as run {new_run_id}"})
            old.finish("FAILED")


def _final_evaluation(spec, model, bundle, folder, device, logger, class_names, it, best_it) -> dict[str, float]:
    """Evaluate the best-val-mIoU weights on the test split; log metrics and artifacts."""
    from study import visualize

    best = ckpt.load(folder / "best.pt", map_location=device)
    model.load_state_dict(best["model"])
    eval_bs = spec.train.eval_batch_size or spec.train.batch_size
    test_loader = DataLoader(bundle.test, batch_size=eval_bs, shuffle=False, num_workers=spec.train.workers,
                             generator=torch.Generator().manual_seed(spec.seed))
    cm = evaluate(model, test_loader, bundle.num_classes, bundle.ignore_index, device, spec.train.amp)
    result = cm.compute()
    metrics = eval_metrics("test", result, class_names)
    metrics["test/best_iteration"] = float(best_it)
    logger.log_metrics(metrics, it)
    logger.flush()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mat = cm.mat.cpu().numpy()
        visualize.per_class_csv(result, mat, class_names, tmp / "per_class_test.csv")
        np.save(tmp / "confusion_test.npy", mat)
        visualize.confusion_png(mat, class_names, tmp / "confusion_test.png")
        for name in ("per_class_test.csv", "confusion_test.npy", "confusion_test.png"):
            logger.log_artifact(tmp / name, "metrics")
        pred_dir = tmp / "predictions"
        visualize.prediction_overlays(model, bundle.test, spec.train.num_overlays, device, pred_dir)
        for p in sorted(pred_dir.glob("*.png")):
            logger.log_artifact(p, "predictions")
        if spec.tracking.log_checkpoint:
            logger.log_artifact(folder / "best.pt", "checkpoints")
    return metrics

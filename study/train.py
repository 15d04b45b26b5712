"""The training loop: iteration-based, evaluated with the metric core, checkpointed, resumable.

``train(spec)`` trains one run spec and leaves one complete MLflow run (docs/architecture.md lists what
is logged). Resuming: if ``{checkpoint_root}/{experiment}/{spec_hash}/last.pt`` exists, training
continues from it in the same MLflow run; model, optimizer, scheduler, loss buffers (EMA weights),
RNG states and the iteration are restored, and the batch order and augmentation of every iteration
are a function of (seed, iteration) (``study.determinism``), so an interrupted and resumed CPU run
ends with the same metrics as an uninterrupted one. Metrics reach MLflow at checkpoints, so a
resumed run never holds a step twice (``study.runrecord``).

Host synchronisation happens only every ``log_interval`` iterations (one transfer of the buffered
losses and weights), at evaluations and at checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from study import checkpoint as ckpt
from study import claim as claims
from study import runrecord, tracking
from study.determinism import IterationBatchSampler, SeededSamples, rng_state, seed_everything, set_rng_state
from study.spec import RunSpec, run_name, spec_hash

__all__ = ["IterationBatchSampler", "RunResult", "SeededSamples", "TrainingFailed", "checkpoint_dir", "train"]


HEARTBEAT_EVERY_S = 30.0  # `study status` calls a RUNNING run stale after 10 minutes without one


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
    skipped: str = ""  # why nothing was trained: another live job holds the run, or it is finished


@dataclasses.dataclass
class Parts:
    """Everything a run trains with, built from the spec (and restored from a checkpoint)."""

    device: torch.device
    bundle: object
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    folder: Path
    start: int = 0
    best_miou: float = -1.0
    best_it: int = -1
    state: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.class_names)


# ----------------------------------------------------------------------------- building blocks


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingFailed("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def metric_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def accel_format(channels_last: bool) -> torch.memory_format:
    from study.accel import input_memory_format

    return input_memory_format(channels_last)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, loader, num_classes: int, ignore_index: int, device, amp: bool):
    """Run ``model`` over ``loader``; return the filled ConfusionMatrix (accumulated on ``device``)."""
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


def eval_metrics(prefix: str, result: dict, class_names: list[str]) -> dict[str, float]:
    """Flatten ConfusionMatrix.compute() into MLflow metric names (NaN classes are left out)."""
    out = {f"{prefix}/{k}": float(result[k]) for k in ("miou", "macc", "mprec", "pixel_acc", "fwiou")}
    for kind in ("iou", "recall", "precision"):
        for name, value in zip(class_names, result[kind]):
            if not math.isnan(value):
                out[f"{prefix}/{kind}/{metric_key(name)}"] = float(value)
    return {k: v for k, v in out.items() if not math.isnan(v)}


def rgb255(images: torch.Tensor, transform) -> torch.Tensor:
    """Normalised network input -> float RGB in 0..255 (undoes the transform's mean/std and BGR order)."""
    mean = torch.tensor(transform.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    rgb = images * std + mean
    return rgb.flip(1) if transform.bgr else rgb


def checkpoint_dir(spec: RunSpec, h: str | None = None) -> Path:
    return Path(spec.tracking.checkpoint_root).resolve() / spec.tracking.experiment / (h or spec_hash(spec))


def _eval_loader(spec: RunSpec, dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=spec.train.eval_batch_size or spec.train.batch_size, shuffle=False,
                      num_workers=spec.train.workers, generator=torch.Generator().manual_seed(spec.seed))


def build_parts(spec: RunSpec, h: str, fresh: bool) -> Parts:
    """Data, model, loss, optimizer and schedule of ``spec``, restored from its checkpoint if any."""
    from study.data import build_datasets
    from study.losses import LOSSES, build_loss
    from study.models import build_model
    from study.optim import build_optimizer, build_scheduler

    from study import accel

    t = spec.train
    device = pick_device(t.device)
    if t.deterministic:
        accel.deterministic(True)
    accel.configure_backends(device, tf32=t.tf32, cudnn_benchmark=t.cudnn_benchmark)
    bundle = build_datasets(spec.data, spec.data.split_seed)
    seed_everything(spec.seed)  # after the data: a cached and a fresh data set must give the same model
    m = spec.model
    model = build_model(m.arch, m.backbone, bundle.num_classes, m.output_stride, m.pretrained,
                        decoder=m.decoder).to(device)
    needs = LOSSES[spec.loss.name].needs
    params = dict(spec.loss.params)
    if "class_counts" in needs:
        params["class_counts"] = [int(c) for c in bundle.class_counts]
    if "features" in needs:
        params["feature_channels"] = model.feature_channels
    if "train_masks" in needs and spec.loss.params.get("edge_net") == "train_masks" \
            and not spec.loss.params.get("edge_net_path"):
        params["train_masks"] = training_masks(bundle)
    loss_fn = build_loss(spec.loss.name, bundle.num_classes, ignore_index=bundle.ignore_index, **params).to(device)
    # a loss with parameters of its own (DFR's feature consistency head) trains with the model
    optimizer = build_optimizer(t.optimizer, [*model.parameters(), *loss_fn.parameters()],
                                accel.optimizer_kwargs(t.optimizer.name, device, t.fused_optimizer))
    model = accel.prepare_model(model, channels_last=t.channels_last, compile=t.compile)
    scheduler = build_scheduler(spec.train, optimizer)
    parts = Parts(device, bundle, model, loss_fn, optimizer, scheduler, checkpoint_dir(spec, h))
    _restore(parts, h, fresh)
    return parts


def _restore(parts: Parts, h: str, fresh: bool) -> None:
    """Load the latest good checkpoint of this spec into ``parts`` (``fresh`` deletes it first)."""
    if fresh and parts.folder.exists():
        for f in parts.folder.iterdir():
            if f.is_file() and f.name != claims.CLAIM_FILE:  # the claim stays locked by this job
                f.unlink()
    state, parts.notes = ckpt.load_latest(parts.folder, map_location=parts.device)
    parts.state = state
    if state is None or state.get("spec_hash") != h:
        return
    _plain(parts.model).load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.loss_fn.load_state_dict(state["loss"])
    set_rng_state(state["rng"])
    parts.start, parts.best_miou, parts.best_it = state["iteration"], state["best_miou"], state["best_iteration"]


def labelled_fractions(bundle) -> dict[str, float]:
    """``data/labelled_fraction/{split}``: labelled pixels / all pixels of each split's targets (scribbles
    label a few % of the training pixels; validation and test keep full labels)."""
    from study.data.scribbles import labelled_fraction

    return {f"data/labelled_fraction/{s}": labelled_fraction(getattr(bundle, s)) for s in ("train", "val", "test")}


def training_masks(bundle) -> np.ndarray:
    """The training split's full ground-truth label maps after the fixed resize, uint8 [M, H, W]."""
    train = getattr(bundle.train, "dataset", bundle.train)  # full labels under scribble supervision
    return np.stack([np.asarray(train.load_target(i), dtype=np.uint8) for i in range(len(train))])


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state dict is saved (the one behind a torch.compile wrapper)."""
    from study.accel import unwrap

    return unwrap(model)


def _peek_state(folder: Path) -> dict | None:
    """The latest checkpoint's state, or None (used to find the run a failed setup belongs to)."""
    try:
        return ckpt.load_latest(folder, map_location="cpu")[0]
    except Exception:  # noqa: BLE001 - best effort
        return None


def _resumed(parts: Parts, h: str) -> bool:
    return parts.state is not None and parts.state.get("spec_hash") == h


# ----------------------------------------------------------------------------- the loop


class Loop:
    """One run's iterations: step, buffered logging, validation, checkpoints (see the module docstring)."""

    def __init__(self, spec: RunSpec, h: str, parts: Parts, logger: tracking.RunLogger, say, timings: dict):
        self.spec, self.h, self.p, self.logger, self.say, self.timings = spec, h, parts, logger, say, timings
        self.losses: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        from study.losses import LOSSES

        self.track_weights = bool(LOSSES[spec.loss.name].extra.get("tracks_weights"))
        self.needs = LOSSES[spec.loss.name].needs
        self.val_loader = _eval_loader(spec, parts.bundle.val)
        self.checkpointed = parts.start
        self.it = parts.start
        self.last_beat = time.monotonic()

    def batches(self, end: int) -> DataLoader:
        p, t = self.p, self.spec.train
        return DataLoader(
            SeededSamples(p.bundle.train),
            batch_sampler=IterationBatchSampler(len(p.bundle.train), t.batch_size, self.spec.seed, p.start, end),
            num_workers=t.workers, pin_memory=p.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.spec.seed),  # never draw from the global RNG (resume)
        )

    def forward_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, handing the loss what its entry declares it needs (image, features)."""
        p, extra = self.p, {}
        with _autocast(p.device, self.spec.train.amp):
            if "features" in self.needs:
                logits, extra["features"] = p.model(images, return_features=True)
            else:
                logits = p.model(images)
        if "image" in self.needs:
            extra["image"] = rgb255(images, p.bundle.train.transform)
        return p.loss_fn(logits, targets, **extra)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        p = self.p
        loss = self.forward_loss(images, targets)
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        p.optimizer.step()
        p.scheduler.step()
        self.it += 1
        self.losses.append(loss.detach())
        if self.track_weights and getattr(p.loss_fn, "last_weights", None) is not None:
            self.weights.append(p.loss_fn.last_weights.detach())

    def flush_logs(self) -> None:
        """One host transfer for the buffered losses; NaN/Inf fails the run."""
        if not self.losses:
            return
        t, it = time.perf_counter(), self.it
        values = torch.stack(self.losses).float().cpu().tolist()
        first = it - len(values) + 1
        bad = [first + i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise TrainingFailed(f"non-finite loss ({values[bad[0] - first]}) at iteration {bad[0]}")
        for i, v in enumerate(values):
            self.logger.log_metrics({"train/loss": v}, first + i)
        lr = self.p.scheduler.get_last_lr()[0]
        self.logger.log_metrics({"train/lr": lr}, it)
        if self.weights:
            w = self.weights[-1].float().cpu().tolist()
            names = self.p.class_names
            self.logger.log_metrics({f"recall_weight/{metric_key(n)}": x for n, x in zip(names, w)}, it)
        self.say(f"iteration {it}/{self.spec.train.iterations}  loss {values[-1]:.4f}  lr {lr:.3g}")
        self.losses.clear()
        self.weights.clear()
        if time.monotonic() - self.last_beat >= HEARTBEAT_EVERY_S:  # one tag write, at most every 30 s
            runrecord.heartbeat(self.logger)
            self.last_beat = time.monotonic()
        self.timings["logging"] += time.perf_counter() - t

    def validate(self) -> None:
        t, p = time.perf_counter(), self.p
        cm = evaluate(p.model, self.val_loader, p.bundle.num_classes, p.bundle.ignore_index, p.device,
                      self.spec.train.amp)
        result = cm.compute()
        self.logger.log_metrics(eval_metrics("val", result, p.class_names), self.it)
        if result["miou"] > p.best_miou:
            p.best_miou, p.best_it = float(result["miou"]), self.it
            ckpt.save({"model": _plain(p.model).state_dict(), "iteration": self.it, "miou": p.best_miou}, p.folder / "best.pt")
        self.timings["eval"] += time.perf_counter() - t

    def save_state(self) -> None:
        t, p = time.perf_counter(), self.p
        ckpt.save({"model": _plain(p.model).state_dict(), "optimizer": p.optimizer.state_dict(),
                   "scheduler": p.scheduler.state_dict(), "loss": p.loss_fn.state_dict(), "rng": rng_state(),
                   "iteration": self.it, "best_miou": p.best_miou, "best_iteration": p.best_it,
                   "run_id": self.logger.run_id, "spec_hash": self.h, "commit": self.logger.pending_rows()},
                  p.folder / "last.pt", keep_previous=True)
        runrecord.commit(self.logger, self.it)
        self.checkpointed = self.it
        self.timings["checkpoint"] += time.perf_counter() - t

    def run(self, end: int, bar) -> None:
        """Iterate up to ``end``: step, log every log_interval, validate, checkpoint."""
        t_cfg = self.spec.train
        ckpt_every = t_cfg.checkpoint_interval or t_cfg.eval_interval
        t_data = time.perf_counter()
        self.p.model.train()
        fmt = accel_format(self.spec.train.channels_last)
        for images, targets in self.batches(end):
            images = images.to(self.p.device, non_blocking=True, memory_format=fmt)
            targets = targets.to(self.p.device, non_blocking=True)
            t_step = time.perf_counter()
            self.timings["data"] += t_step - t_data
            self.step(images, targets)
            self.timings["step"] += time.perf_counter() - t_step
            if bar is not None:
                bar.update(1)
            if self.it % t_cfg.log_interval == 0 or self.it == end:
                self.flush_logs()
            if self.it % t_cfg.eval_interval == 0 or self.it == t_cfg.iterations:
                self.validate()
            if self.it % ckpt_every == 0 or self.it == end:
                self.save_state()
            t_data = time.perf_counter()
        self.flush_logs()


def _final_evaluation(spec, parts: Parts, logger, it: int) -> dict[str, float]:
    """Evaluate the best-val-mIoU weights on the test split; log metrics and artifacts."""
    from study import visualize

    p = parts
    best = ckpt.load(p.folder / "best.pt", map_location=p.device)
    _plain(p.model).load_state_dict(best["model"])
    cm = evaluate(p.model, _eval_loader(spec, p.bundle.test), p.bundle.num_classes, p.bundle.ignore_index,
                  p.device, spec.train.amp)
    result = cm.compute()
    metrics = eval_metrics("test", result, p.class_names)
    metrics["test/best_iteration"] = float(p.best_it)
    logger.log_metrics(metrics, it)
    logger.flush()
    runrecord.log_summary(logger, metrics, it)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mat = cm.mat.cpu().numpy()
        visualize.per_class_csv(result, mat, p.class_names, tmp / "per_class_test.csv")
        np.save(tmp / "confusion_test.npy", mat)
        visualize.confusion_png(mat, p.class_names, tmp / "confusion_test.png")
        for name in ("per_class_test.csv", "confusion_test.npy", "confusion_test.png"):
            logger.log_artifact(tmp / name, "metrics")
        pred_dir = tmp / "predictions"
        visualize.prediction_overlays(p.model, p.bundle.test, spec.train.num_overlays, p.device, pred_dir)
        for f in sorted(pred_dir.glob("*.png")):
            logger.log_artifact(f, "predictions")
        if spec.tracking.log_checkpoint:
            logger.log_artifact(p.folder / "best.pt", "checkpoints")
    return metrics


def _open_record(spec, h, parts: Parts, uri, experiment_id, parent_run_id, grid, axes) -> tracking.RunLogger:
    """Reopen the checkpoint's run, or start a new one (closing runs whose checkpoints were unusable)."""
    if _resumed(parts, h):
        logger = runrecord.reopen(uri, parts.state["run_id"])
        runrecord.finish_interrupted_commit(logger, parts.state)
    else:
        counts = [int(c) for c in parts.bundle.class_counts]
        logger = runrecord.start(spec, h, uri, experiment_id, parent_run_id, grid, axes, parts.class_names, counts)
        if spec.data.supervision != "full":
            logger.log_metrics(labelled_fractions(parts.bundle), 0)
        if parts.notes:  # the run those checkpoints belonged to cannot continue: close it, pointing here
            parts.notes.append("no usable checkpoint: restarted from iteration 0 in this new run")
            runrecord.close_unresumable(uri, experiment_id, h, logger.run_id)
    if parts.notes:
        logger.set_tags({"study.warning": " | ".join(parts.notes)[:4000]})
    edge_net_file = getattr(parts.loss_fn, "edge_net_file", None)
    if edge_net_file is not None and not _resumed(parts, h):  # SEMEDA's prepared edge network
        logger.log_artifact(edge_net_file, "edge_net")
    return logger


def _progress(spec: RunSpec, parts: Parts, progress: bool | None):
    """A tqdm bar on a terminal; otherwise ``say`` prints a line per log_interval to stderr."""
    on_terminal = os.isatty(2) and "SLURM_JOB_ID" not in os.environ
    show = progress if progress is not None else on_terminal
    if show:
        from tqdm import tqdm

        bar = tqdm(total=spec.train.iterations, initial=parts.start, desc=run_name(spec), dynamic_ncols=True,
                   mininterval=1.0)
        return bar, (lambda text: None)
    quiet = progress is False and on_terminal
    return None, ((lambda text: None) if quiet else (lambda text: print(f"[{run_name(spec)}] {text}",
                                                                      file=sys.stderr, flush=True)))


def train(spec: RunSpec, *, experiment_id: str | None = None, parent_run_id: str | None = None,
          grid: str | None = None, axes: dict | None = None, fresh: bool = False, progress: bool | None = None,
          stop_after: int | None = None, h: str | None = None) -> RunResult:
    """Train ``spec`` to ``train.iterations`` (or stop early after ``stop_after`` iterations, for tests).

    ``h``: the spec hash when the caller already has it. Returns the run id and final test metrics.
    Raises TrainingFailed after marking the run FAILED.

    The run is claimed first (``study.claim``: a lock beside its checkpoints, held until this returns).
    If another live job holds it, or the experiment already has a FINISHED run of this spec (checked
    under the claim), nothing is trained and the result's ``skipped`` says why.
    """
    t0 = time.perf_counter()
    h = h or spec_hash(spec)
    uri = tracking.resolve_uri(spec.tracking.uri)
    if experiment_id is None:
        uri, experiment_id = tracking.prepare(uri, spec.tracking.experiment)
    claim = claims.take(checkpoint_dir(spec, h), grid=grid or "")
    if claim is None:
        held = claims.describe(claims.read_record(claims.claim_path(checkpoint_dir(spec, h))))
        return RunResult("", h, 0, {}, False, {}, skipped=f"held by live {held}")
    with claim:
        if runrecord.has_finished(uri, experiment_id, h):  # checked under the claim: no second FINISHED run
            return RunResult("", h, 0, {}, False, {}, skipped="already finished")
        return _train_claimed(spec, h, uri, experiment_id, claim, parent_run_id=parent_run_id, grid=grid,
                              axes=axes, fresh=fresh, progress=progress, stop_after=stop_after, t0=t0)


def _train_claimed(spec: RunSpec, h: str, uri: str, experiment_id: str, claim, *, parent_run_id, grid, axes,
                   fresh: bool, progress, stop_after, t0: float) -> RunResult:
    """The body of :func:`train`, run while this process holds the run's claim."""
    timings = {"setup": 0.0, "data": 0.0, "step": 0.0, "eval": 0.0, "logging": 0.0, "checkpoint": 0.0}
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    parts = None
    try:  # errors before training starts still leave a FAILED run with the reason
        parts = build_parts(spec, h, fresh)
    except Exception as err:
        state = _peek_state(checkpoint_dir(spec, h))
        runrecord.record_setup_failure(spec, h, uri, experiment_id, parent_run_id, grid, axes, state, err)
        raise
    logger = _open_record(spec, h, parts, uri, experiment_id, parent_run_id, grid, axes)
    claim.note(run_id=logger.run_id)
    runrecord.heartbeat(logger)
    resumed = _resumed(parts, h)
    total = spec.train.iterations
    end = total if stop_after is None else min(total, parts.start + stop_after)
    bar, say = _progress(spec, parts, progress)
    if resumed:
        say(f"resumed run {logger.run_id} from iteration {parts.start} (checkpoint {parts.folder})")
    else:
        say(f"started run {logger.run_id} at iteration 0 (checkpoints in {parts.folder})")
    loop = Loop(spec, h, parts, logger, say, timings)
    monitor = runrecord.start_system_metrics(logger, spec.tracking.system_metrics,
                                             spec.tracking.system_metrics_interval, resumed)
    timings["setup"] += time.perf_counter() - t0
    try:
        loop.run(end, bar)
        if bar is not None:
            bar.close()
        if loop.it < total:  # stopped early on purpose (tests, time budget): leave the run resumable
            runrecord.stop_system_metrics(monitor)
            return RunResult(logger.run_id, h, loop.it, {}, resumed, timings)
        t = time.perf_counter()
        metrics = _final_evaluation(spec, parts, logger, loop.it)
        timings["eval"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        logger.set_tags({"study.iteration": loop.it,
                         "study.timings": json.dumps({k: round(v, 3) for k, v in timings.items()})})
        runrecord.stop_system_metrics(monitor)
        runrecord.describe(logger)
        logger.finish("FINISHED")
        return RunResult(logger.run_id, h, loop.it, metrics, resumed, timings)
    except BaseException as err:
        runrecord.stop_system_metrics(monitor)
        if bar is not None:
            bar.close()
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            runrecord.interrupted(logger, loop.it, loop.checkpointed)
            raise
        reason = f"{type(err).__name__}: {err}"
        try:
            runrecord.fail(logger, reason, loop.it)
        finally:
            if isinstance(err, TrainingFailed):
                raise
            raise TrainingFailed(reason) from err

"""The MLflow record of one run: start or reopen, params and tags, failure, close.

Everything ``train()`` writes about a run's identity and fate goes through here (docs/architecture.md
lists the names). Metrics are buffered by :class:`study.tracking.RunLogger` and reach the store only
at checkpoints and at the end (:meth:`RunRecord.commit`), so a run interrupted after its last
checkpoint and resumed from it never holds a step twice.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from study import runpage, tracking
from study.spec import RunSpec, flatten, loss_label, signature, to_dict, to_yaml


def group_key(spec: RunSpec) -> str:
    """Identity of the run's *setting*: the hash of its signature without the seed.

    Runs that share it differ only in their seed, so a report may average them and never pools
    runs whose resolved settings differ in anything else.
    """
    import hashlib

    from study.data import data_fingerprint

    sig = signature(spec)
    sig.pop("seed", None)
    sig["data"]["content"] = data_fingerprint(spec.data)
    return hashlib.sha256(json.dumps(sig, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def spec_tags(spec: RunSpec, h: str, grid: str | None, axes: dict | None) -> dict[str, Any]:
    """The run tags that depend on the spec alone."""
    from study.data import data_fingerprint

    tags: dict[str, Any] = {
        "study.spec_hash": h,
        "study.group": group_key(spec),
        "study.loss": loss_label(spec),
        "study.loss_name": spec.loss.name,
        "study.loss_params": json.dumps(spec.loss.params, sort_keys=True),
        "study.dataset": spec.data.name,
        "study.data_fingerprint": data_fingerprint(spec.data),
        "study.backbone": spec.model.backbone,
        "study.arch": spec.model.arch,
        "study.seed": spec.seed,
        "study.git_commit": tracking.git_commit(),
        "study.versions": json.dumps(tracking.library_versions()),
    }
    if grid:
        tags["study.grid"] = grid
    if axes:
        tags["study.axes"] = json.dumps(axes, sort_keys=True, default=str)
    return tags


def start(spec: RunSpec, h: str, uri: str, experiment_id: str, parent_run_id: str | None, grid: str | None,
          axes: dict | None, class_names: list[str], class_counts: list[int]) -> tracking.RunLogger:
    """A new MLflow run with the spec's tags, its flattened settings as params and ``spec.yaml``."""
    tags = {**spec_tags(spec, h, grid, axes), "study.class_names": json.dumps(class_names), "study.iteration": 0,
            "study.class_counts": json.dumps(class_counts)}
    logger = tracking.RunLogger.start(uri, experiment_id, runpage.run_name(spec, axes), tags, parent_run_id)
    logger.log_params(flatten(to_dict(spec)))
    log_dataset(logger, spec)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "spec.yaml"
        p.write_text(to_yaml(spec))
        logger.log_artifact(p)
    return logger


def reopen(uri: str, run_id: str) -> tracking.RunLogger:
    """The run a checkpoint belongs to, marked RUNNING again."""
    logger = tracking.RunLogger(uri, run_id)
    logger.reopen()
    return logger


def commit(logger: tracking.RunLogger, iteration: int) -> None:
    """Write the buffered metrics and the iteration reached (called right after each checkpoint, which
    holds the same metrics: see :func:`finish_interrupted_commit`)."""
    logger.flush()
    logger.set_tags({"study.iteration": iteration})


def finish_interrupted_commit(logger: tracking.RunLogger, state: dict) -> int:
    """Complete the commit a kill may have cut short; returns the number of metrics written.

    A checkpoint of iteration k holds the metrics buffered since the previous one (``state["commit"]``)
    and is saved before they are written; ``study.iteration`` = k is set after. If the tag is below k,
    the process died between the save and the end of the write: the rows the store lacks (by key and
    step) are written now. So every step up to the checkpoint is logged exactly once, and the steps
    after it are logged by the resumed run."""
    rows = state.get("commit") or []
    iteration = int(state.get("iteration", 0))
    done = logger.client.get_run(logger.run_id).data.tags.get("study.iteration")
    if not rows or (done is not None and done.isdigit() and int(done) >= iteration):
        return 0
    written = logger.log_missing(rows)
    logger.set_tags({"study.iteration": iteration})
    return written


def fail(logger: tracking.RunLogger, reason: str, iteration: int) -> None:
    """Close the run FAILED with its reason in full (``study.failure``)."""
    logger.discard_pending()
    logger.set_tags({"study.failure": reason[:5000], "study.iteration": iteration})
    describe(logger, reason)
    logger.finish("FAILED")


def interrupted(logger: tracking.RunLogger, iteration: int, checkpointed: int) -> None:
    """Leave an interrupted run resumable: metrics after the last checkpoint are dropped (they will be
    logged again by the resumed run), the interruption is noted."""
    logger.discard_pending()
    logger.set_tags({"study.interrupted": f"at iteration {iteration}; resumes from {checkpointed}"})


def record_setup_failure(spec: RunSpec, h: str, uri: str, experiment_id: str, parent_run_id: str | None,
                         grid: str | None, axes: dict | None, state: dict | None, err: BaseException) -> None:
    """Mark the run FAILED for an error raised before the first step: the resumed run when the
    checkpoint names one, else a new run. Best effort: a store error here is only warned about."""
    reason = f"{type(err).__name__}: {err}"[:5000]
    try:
        run_id = state.get("run_id") if isinstance(state, dict) and state.get("spec_hash") == h else None
        if run_id:
            logger = tracking.RunLogger(uri, run_id)
        else:
            logger = tracking.RunLogger.start(uri, experiment_id, runpage.run_name(spec, axes),
                                              spec_tags(spec, h, grid, axes), parent_run_id)
        logger.set_tags({"study.failure": reason})
        describe(logger, reason)
        logger.finish("FAILED")
    except Exception as store_err:  # noqa: BLE001
        warnings.warn(f"could not record the failure in MLflow ({store_err}); the failure was: {reason}", stacklevel=2)


def close_unresumable(uri: str, experiment_id: str, h: str, new_run_id: str) -> None:
    """Mark RUNNING runs of spec ``h`` FAILED: their checkpoints were unusable, ``new_run_id`` restarts them."""
    for run in tracking.find_runs(uri, experiment_id, [h]).get(h, []):
        if run.info.run_id != new_run_id and run.info.status == "RUNNING":
            old = tracking.RunLogger(uri, run.info.run_id)
            old.set_tags({"study.failure": f"checkpoints unusable; restarted from scratch as run {new_run_id}"})
            old.finish("FAILED")


HEARTBEAT_TAG = "study.heartbeat"


def heartbeat(logger: tracking.RunLogger) -> None:
    """Stamp the run as alive now (``study.heartbeat`` = unix time in seconds); ``study status`` calls a
    RUNNING run stale when this is old."""
    import time

    logger.set_tags({HEARTBEAT_TAG: int(time.time())})


def has_finished(uri: str, experiment_id: str, h: str) -> bool:
    """True if the experiment already holds a FINISHED run of spec ``h`` (read-only lookup)."""
    return "FINISHED" in tracking.find_run_states(uri, experiment_id).get(h, [])


# ----------------------------------------------------------------------------- the run's page in the UI


def log_dataset(logger: tracking.RunLogger, spec: RunSpec) -> None:
    """Record the run's data set as an MLflow dataset input (the UI's Datasets column).

    name = the data set's name, source = its root folder, digest = ``data_fingerprint`` (what the
    data is: the same digest means the same content, as in the spec hash).
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from study.data import data_fingerprint

    dataset = Dataset(name=spec.data.name, digest=data_fingerprint(spec.data), source_type="local",
                      source=json.dumps({"uri": str(Path(spec.data.root).resolve())}))
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "train")]
    logger._retry(lambda: logger.client.log_inputs(logger.run_id, datasets=[DatasetInput(dataset, tags)]))


#: Room left for the description in a tag value (MLflow truncates tag values at 8000 characters).
FAILURE_CHARS = 6000


def describe(logger: tracking.RunLogger, failure: str | None = None) -> None:
    """Write the run's description (``mlflow.note.content``) from its tags and metrics in the store.

    ``failure``: the reason in full; beyond ``FAILURE_CHARS`` characters the description shows its
    start and the full text is logged as the artifact ``failure.txt``. Best effort: a store error is
    only warned about (a description never fails or hides a run's fate).
    """
    try:
        _write_description(logger, failure)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"could not write the run's description ({err})", stacklevel=2)


def _write_description(logger: tracking.RunLogger, failure: str | None) -> None:
    run = logger.client.get_run(logger.run_id)
    tags = dict(run.data.tags)
    if failure is not None:
        tags["study.failure"] = failure
    if len(tags.get("study.failure", "")) > FAILURE_CHARS:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "failure.txt"
            p.write_text(tags["study.failure"])
            logger.log_artifact(p)
        tags["study.failure"] = tags["study.failure"][:FAILURE_CHARS] + "\n... (in full: artifact failure.txt)"
    text = runpage.run_description(tags, run.data.metrics, run.info.experiment_id, run.info.run_id)
    logger.set_tags({runpage.NOTE_TAG: text})


def log_summary(logger: tracking.RunLogger, metrics: dict[str, float], iteration: int) -> None:
    """Copy the headline metrics under ``Summary/`` so the UI lists them first (``study.runpage``):
    the test metrics at ``iteration`` and the validation mIoU curve step by step. Call after the
    metrics were flushed."""
    copies = [tracking.Metric(k, v, int(1000 * time.time()), iteration)
              for k, v in runpage.summary_metrics(metrics).items()]
    for key in runpage.SUMMARY_CURVES:
        copies += [tracking.Metric(runpage.summary_key(key), m.value, m.timestamp, m.step)
                   for m in logger.client.get_metric_history(logger.run_id, key)]
    for i in range(0, len(copies), tracking.MAX_METRICS_PER_BATCH):
        chunk = copies[i:i + tracking.MAX_METRICS_PER_BATCH]
        logger._retry(lambda: logger.client.log_batch(logger.run_id, metrics=chunk))


class SystemMetrics:
    """MLflow's system-metrics monitor on one run, stopped once (:func:`stop_system_metrics`)."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.stopped = False


def start_system_metrics(logger: tracking.RunLogger, enabled: bool, interval_s: float,
                         resumed: bool) -> SystemMetrics | None:
    """MLflow's system-metrics monitor on this run (``system/*``: CPU, RAM, disk, network, and GPU
    utilisation and memory where ``pynvml`` finds a GPU), sampling every ``interval_s`` seconds;
    None when ``enabled`` is false or the monitor cannot load (psutil missing: warned about).
    A resumed run continues the monitor's steps."""
    if not enabled:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as err:  # psutil missing: the run goes on without system metrics
        warnings.warn(f"tracking.system_metrics is on but MLflow's monitor cannot load ({err}); "
                      "install psutil (and nvidia-ml-py for GPU metrics)", stacklevel=2)
        return None
    monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=interval_s, resume_logging=resumed,
                                   tracking_uri=logger.uri)
    monitor.start()
    return SystemMetrics(monitor)


def stop_system_metrics(handle: SystemMetrics | None) -> None:
    """Stop the monitor and log one last sample, so a run shorter than the sampling interval still
    has its system metrics. Idempotent; None is a no-op."""
    if handle is None or handle.stopped:
        return
    handle.stopped = True
    monitor = handle.monitor
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - system metrics never fail a run
        warnings.warn(f"could not log the last system-metrics sample ({err})", stacklevel=2)

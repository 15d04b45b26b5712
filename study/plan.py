"""Planning a launch: dedup a grid against MLflow, prepare its data once, the grid's parent run.

Identity is the spec hash (study/spec.py). Every spec of the grid is looked up in the experiment:
finished runs are skipped; failed, unfinished or missing ones are submitted, and a job whose
checkpoint folder holds a training state resumes it in the same MLflow run. A run whose claim
(``study.claim``) a live job holds is neither submitted nor skipped as finished: it is ``held``. The store and
experiment are created once, here, before any job starts; jobs get the experiment id.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from study import claim as claims
from study import tracking
from study.grid import Grid, GridRun
from study.spec import SpecError


class LaunchError(RuntimeError):
    pass


@dataclasses.dataclass
class Plan:
    grid: Grid
    uri: str
    experiment_id: str
    submit: list[GridRun]
    skip: list[GridRun]
    states: dict[str, str]
    held: dict[str, str] = dataclasses.field(default_factory=dict)  # hash -> the live job holding it


def plan(grid: Grid, create: bool = True) -> Plan:
    """Split the grid into runs to submit and runs to skip; ``create=False`` never creates a store
    or experiment (a dry run or status on a store that does not exist reports every run missing)."""
    spec0 = grid.runs[0].spec
    uri = tracking.resolve_uri(spec0.tracking.uri)
    if create:
        uri, exp_id = tracking.prepare(uri, spec0.tracking.experiment)
    else:
        exp_id = tracking.find_experiment(uri, spec0.tracking.experiment)
    found = tracking.find_run_states(uri, exp_id) if exp_id is not None else {}
    states = {r.hash: tracking.run_state(found.get(r.hash, [])) for r in grid.runs}
    held = {}
    for r in grid.runs:
        record = claims.holder(run_folder(r)) if states[r.hash] != "finished" else None
        if record is not None:
            held[r.hash] = claims.describe(record)
    submit = [r for r in grid.runs if states[r.hash] != "finished" and r.hash not in held]
    skip = [r for r in grid.runs if states[r.hash] == "finished"]
    return Plan(grid, uri, exp_id, submit, skip, states, held)


def run_folder(run: GridRun) -> Path:
    """The run's checkpoint folder (where its claim lives): ``{checkpoint_root}/{experiment}/{hash}``."""
    t = run.spec.tracking
    return Path(t.checkpoint_root).resolve() / t.experiment / run.hash


def check_writable(folder: str | Path, where: str, key: str = "tracking.checkpoint_root") -> None:
    """Create ``folder`` if needed and a file in it; a SpecError naming ``where`` and ``key`` if that fails.

    Checked by ``study run`` and ``study launch`` before anything trains (the first checkpoint would
    otherwise fail after the first ``checkpoint_interval`` iterations)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SpecError(f"{where}: {key}: {str(folder)!r} is not writable ({err.strerror or err}) "
                        f"(allowed: a folder this user can create files in)") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{where}: {key}: {str(folder)!r} is not writable (allowed: a folder this user can "
                        f"create files in)")


def prepare_data(runs: list[GridRun], log=print, where: str = "<grid>") -> None:
    """Generate / list / count each distinct data set once before any job starts.

    Jobs then find the texdigits tree and the class-count cache ready and only read them, instead
    of 24 jobs starting together repeating the pass over every training label.
    """
    from study.data import build_datasets, data_fingerprint

    seen: set[tuple] = set()
    for run in runs:
        d = run.spec.data
        key = (data_fingerprint(d), d.root, d.class_counts, tuple(d.size or ()), d.void)
        if key in seen:
            continue
        seen.add(key)
        try:
            bundle = build_datasets(d, d.split_seed)
        except (ValueError, OSError) as err:  # bad labels or images: found here, before any job starts
            raise SpecError(f"{where} [{run.label()}]: data.root: {' '.join(str(err).split())} "
                            f"(allowed: images and labels the data set's format describes)") from None
        log(f"  data {d.name} ready: {len(bundle.train)}/{len(bundle.val)}/{len(bundle.test)} images, "
            f"class counts cached")


def parent_run(uri: str, experiment_id: str, grid: Grid) -> str:
    """The grid's parent MLflow run (created once, found again on relaunch)."""
    client = tracking.MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`study.grid_parent` = '{grid.name}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"grid:{grid.name}",
                            tags={"study.grid_parent": grid.name, "study.grid_file": str(Path(grid.path).resolve())})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def absolute(run: GridRun, uri: str):
    """A copy of the run's spec with the store, checkpoint root and data root made absolute."""
    spec = run.spec
    tracking_spec = dataclasses.replace(spec.tracking, uri=uri,
                                        checkpoint_root=str(Path(spec.tracking.checkpoint_root).resolve()))
    data = dataclasses.replace(spec.data, root=str(Path(spec.data.root).resolve()))
    return dataclasses.replace(spec, tracking=tracking_spec, data=data)

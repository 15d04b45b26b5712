"""Grid files: a base run spec, axes whose Cartesian product gives the runs, overrides, excludes.

```yaml
name: demo                      # the grid's name (defaults to the file stem); tags every run
base: {...}                     # a partial run spec, the same keys as `study run` takes
axes:                           # dotted path -> list of values; product in the order written
  loss: [ce, {name: focal, params: {gamma: 2}}]   # a string is shorthand for {name: ...}
  seed: [1, 2, 3]
overrides:                      # applied in order to every combination they match
  - when: {loss.name: ohem}     # dotted path -> value or list of accepted values
    set: {train.optimizer.lr: 1.0e-4, resources.timeout_min: 120}
exclude:                        # combinations matching any rule are dropped
  - {loss.name: ohem, model.backbone: paper_resnet18}
resources: {cpus: 2, gpus: 0, mem_gb: 8, timeout_min: 60, partition: null, account: null, slurm: {}}
```

Every expanded spec is validated before anything is submitted; errors name the grid file and the
combination. Two combinations resolving to the same run (same spec hash) are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.spec import RunSpec, SpecError, _build, from_dict, merge, read_yaml, set_path, spec_hash


class GridError(SpecError):
    """A grid file is invalid; the message names the file and the offending combination."""


@dataclass(frozen=True)
class Resources:
    """What one job of the grid asks the executor for."""

    cpus: int = 2
    gpus: int = 0
    mem_gb: float = 8.0
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    max_parallel: int | None = None
    slurm: dict = field(default_factory=dict, hash=False, compare=True)

    def key(self) -> tuple:
        return (self.cpus, self.gpus, self.mem_gb, self.timeout_min, self.partition, self.account,
                tuple(sorted((k, repr(v)) for k, v in self.slurm.items())))


@dataclass
class GridRun:
    spec: RunSpec
    hash: str
    combination: dict[str, Any]
    resources: Resources


@dataclass
class Grid:
    name: str
    path: Path
    runs: list[GridRun]
    resources: Resources


GRID_KEYS = ("name", "base", "axes", "overrides", "exclude", "resources")


def _get(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _matches(raw: dict, rule: dict) -> bool:
    for dotted, accepted in rule.items():
        value = _get(raw, dotted)
        options = accepted if isinstance(accepted, list) else [accepted]
        if value not in options:
            return False
    return True


def _assign(raw: dict, dotted: str, value: Any) -> dict:
    """Set ``dotted`` in ``raw`` (in place; ``raw`` is the combination's private copy) and return it.

    A mapping merges into the mapping already there; a loss of another name drops the old params.
    """
    if dotted == "loss" and isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict):
        current = _get(raw, dotted)
        if isinstance(current, dict):
            if dotted == "loss" and "name" in value and value["name"] != current.get("name"):
                current = {k: v for k, v in current.items() if k != "params"}
            value = merge(current, value)
    else:
        value = copy.deepcopy(value)
    set_path(raw, dotted, value)
    return raw


def _label(value: Any) -> Any:
    if isinstance(value, dict) and "name" in value and len(value) <= 2:
        return value["name"] if not value.get("params") else f"{value['name']}{value['params']}"
    return value


def load_grid(path: str | Path) -> Grid:
    """Expand and validate a grid file; raise GridError naming the file and combination on any problem."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise GridError(f"{where}: a grid must be a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(GRID_KEYS)})")
    name = raw.get("name") or path.stem
    base = raw.get("base") or {}
    axes = raw.get("axes") or {}
    overrides = raw.get("overrides") or []
    excludes = raw.get("exclude") or []
    if not isinstance(axes, dict) or any(not isinstance(v, list) or not v for v in axes.values()):
        raise GridError(f"{where}: key 'axes': expected a mapping of dotted paths to non-empty lists")
    for i, rule in enumerate(overrides):
        if not isinstance(rule, dict) or set(rule) - {"when", "set"} or not isinstance(rule.get("set"), dict):
            raise GridError(f"{where}: key 'overrides[{i}]': expected {{when: {{path: value}}, set: {{path: value}}}}")
    for i, rule in enumerate(excludes):
        if not isinstance(rule, dict) or not rule:
            raise GridError(f"{where}: key 'exclude[{i}]': expected a mapping of dotted paths to values")
    try:
        base_resources = _build(Resources, raw.get("resources") or {}, "resources", where)
    except SpecError as err:
        raise GridError(str(err)) from None

    base_resources_raw = dataclasses.asdict(base_resources)
    runs: list[GridRun] = []
    seen: dict[str, dict] = {}
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        combination = {n: _label(v) for n, v in zip(names, values)}
        spec_raw = copy.deepcopy(base)
        for n, v in zip(names, values):
            spec_raw = _assign(spec_raw, n, v)
        resources_raw = copy.deepcopy(base_resources_raw)
        for rule in overrides:
            if _matches(spec_raw, rule.get("when") or {}):
                for dotted, v in rule["set"].items():
                    if dotted.startswith("resources."):
                        set_path(resources_raw, dotted[len("resources."):], v)
                    else:
                        spec_raw = _assign(spec_raw, dotted, v)
        if any(_matches(spec_raw, rule) for rule in excludes):
            continue
        label = ", ".join(f"{k}={v}" for k, v in combination.items())
        try:
            spec = from_dict(spec_raw, f"{where} [{label}]")
            resources = _build(Resources, resources_raw, "resources", f"{where} [{label}]")
        except SpecError as err:
            raise GridError(str(err)) from None
        h = spec_hash(spec)
        if h in seen:
            other = ", ".join(f"{k}={v}" for k, v in seen[h].items())
            raise GridError(f"{where}: combinations [{other}] and [{label}] resolve to the same run (hash {h}); "
                            f"remove one or make them differ")
        seen[h] = combination
        runs.append(GridRun(spec, h, combination, resources))
    if not runs:
        raise GridError(f"{where}: the grid expands to zero runs (check 'axes' and 'exclude')")
    return Grid(name=name, path=path, runs=runs, resources=base_resources)

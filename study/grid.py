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
claims:                         # which runs are "the recall loss" and "CE" for the paper's claims
  recall: {loss.name: recall, loss.params.official_compat: true}   # matched on resolved settings
  ce: {loss.name: ce}
resources: {cpus: 2, gpus: 0, mem_gb: 8, timeout_min: 60, partition: null, account: null, slurm: {}}
```

Every expanded spec is validated before anything is submitted; errors name the grid file and the
combination. Two combinations resolving to the same run (same spec hash) are an error, and so is an
``overrides``/``exclude`` rule or a ``claims`` selector that matches no combination (a typo would
otherwise be ignored without a word). Each run carries its combination (``GridRun.axes``: dotted
path -> value label, the loss axis labelled by its resolved loss label) and its claims role.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.spec import RunSpec, SpecError, _build, merge, plain_copy, read_yaml, set_path
from study.spec_cache import SectionCache


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
    runs_per_gpu: int = 1
    slurm: dict = field(default_factory=dict, hash=False, compare=True)

    def key(self) -> tuple:
        return (self.cpus, self.gpus, self.mem_gb, self.timeout_min, self.partition, self.account,
                self.runs_per_gpu, tuple(sorted((k, repr(v)) for k, v in self.slurm.items())))


@dataclass
class GridRun:
    spec: RunSpec
    hash: str
    combination: dict[str, Any]
    resources: Resources
    role: str | None = None

    @property
    def axes(self) -> dict[str, Any]:
        """The grid combination: dotted path -> value label (what ``study.axes`` records)."""
        return self.combination

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.combination.items())


@dataclass
class Grid:
    name: str
    path: Path
    runs: list[GridRun]
    resources: Resources
    claims: dict[str, dict] = field(default_factory=dict)


GRID_KEYS = ("name", "base", "axes", "overrides", "exclude", "claims", "resources")
CLAIM_ROLES = ("recall", "ce")
GRID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
DEFAULT_CLAIMS = {"recall": {"loss.name": "recall", "loss.label": "recall"},
                  "ce": {"loss.name": "ce", "loss.label": "ce"}}


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
    """Set ``dotted`` in ``raw`` and return it. ``raw`` is the combination's own top-level mapping; the
    mappings below it may be shared with the base and other combinations, so every mapping on the
    path is copied before it is written (copy on write): untouched sections stay the base's objects.

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
        value = plain_copy(value)
    set_path(raw, dotted, value, "grid", copy_on_write=True)
    return raw


def _check_rules(where: str, axes: Any, overrides: Any, excludes: Any, claims: Any) -> None:
    if not isinstance(axes, dict) or any(not isinstance(v, list) or not v for v in axes.values()):
        raise GridError(f"{where}: axes: expected a mapping of dotted paths to non-empty lists")
    if not isinstance(overrides, list) or not isinstance(excludes, list):
        raise GridError(f"{where}: {'overrides' if not isinstance(overrides, list) else 'exclude'}: expected a list")
    for i, rule in enumerate(overrides):
        if not isinstance(rule, dict) or set(rule) - {"when", "set"} or not isinstance(rule.get("set"), dict):
            raise GridError(f"{where}: overrides[{i}]: expected {{when: {{path: value}}, set: {{path: value}}}}")
    for i, rule in enumerate(excludes):
        if not isinstance(rule, dict) or not rule:
            raise GridError(f"{where}: exclude[{i}]: expected a mapping of dotted paths to values")
    if not isinstance(claims, dict) or set(claims) - set(CLAIM_ROLES) or \
            not all(isinstance(v, dict) and v for v in claims.values()):
        raise GridError(f"{where}: claims: expected {{recall: {{path: value}}, ce: {{path: value}}}} "
                        f"(allowed roles: {', '.join(CLAIM_ROLES)})")


def _selector_matches(view: dict, rule: dict) -> bool:
    for dotted, accepted in rule.items():
        head, _, rest = dotted.partition(".")
        value = view.get(head, {}).get(rest) if rest.startswith("params.") else _get(view, dotted)
        options = accepted if isinstance(accepted, list) else [accepted]
        if value not in options:
            return False
    return True


def _role(view: dict, claims: dict) -> str | None:
    """The first claims role whose selector matches the resolved ``view`` (``SectionCache``'s view)."""
    for role, rule in claims.items():
        if _selector_matches(view, rule):
            return role
    return None


def _expand(base: dict, axes: dict, overrides: list, excludes: list, base_resources: dict,
            used: tuple[set, set]):
    """Yield (combination values, spec mapping, resources mapping); adds the indices of the override and
    exclude rules that matched some combination to ``used``."""
    names = list(axes)
    used_overrides, used_excludes = used
    for values in itertools.product(*(axes[n] for n in names)):
        spec_raw = dict(base)  # sections below are copied on write by _assign
        for n, v in zip(names, values):
            spec_raw = _assign(spec_raw, n, v)
        resources_raw = plain_copy(base_resources)
        for i, rule in enumerate(overrides):
            if _matches(spec_raw, rule.get("when") or {}):
                used_overrides.add(i)
                for dotted, v in rule["set"].items():
                    if dotted.startswith("resources."):
                        set_path(resources_raw, dotted[len("resources."):], v)
                    else:
                        spec_raw = _assign(spec_raw, dotted, v)
        hit = [i for i, rule in enumerate(excludes) if _matches(spec_raw, rule)]
        used_excludes.update(hit)
        if not hit:
            yield dict(zip(names, values)), spec_raw, resources_raw


def _axis_label(dotted: str, value: Any, label: str) -> Any:
    if dotted == "loss" or dotted == "loss.name":
        return label
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values())
    return value


def _refuse_unused(where: str, overrides: list, excludes: list, used: tuple[set, set]) -> None:
    for i, rule in enumerate(overrides):
        if i not in used[0]:
            raise GridError(f"{where}: overrides[{i}]: 'when' {rule.get('when')} matches no combination "
                            f"(allowed: values the axes and base produce)")
    for i, rule in enumerate(excludes):
        if i not in used[1]:
            raise GridError(f"{where}: exclude[{i}]: {rule} matches no combination "
                            f"(allowed: values the axes and base produce)")


def load_grid(path: str | Path) -> Grid:
    """Expand and validate a grid file; raise GridError naming the file and combination on any problem."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise GridError(f"{where}: grid: expected a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS), key=str)
    if unknown:
        raise GridError(f"{where}: {unknown[0]}: unknown key (allowed: {', '.join(GRID_KEYS)})")
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not GRID_NAME.match(name):
        raise GridError(f"{where}: name: {str(name)[:60]!r} is not a valid grid name (allowed: 1-64 letters, "
                        f"digits, '_', '-', '.')")
    base, axes = raw.get("base") or {}, raw.get("axes") or {}
    overrides, excludes = raw.get("overrides") or [], raw.get("exclude") or []
    claims = raw.get("claims") or {}
    _check_rules(where, axes, overrides, excludes, claims)
    claims = {**DEFAULT_CLAIMS, **claims}
    try:
        base_resources = _build(Resources, raw.get("resources") or {}, "resources", where)
    except SpecError as err:
        raise GridError(str(err)) from None
    if base_resources.runs_per_gpu < 1:
        raise GridError(f"{where}: resources.runs_per_gpu: {base_resources.runs_per_gpu} is out of range "
                        f"(allowed: an integer >= 1)")

    runs: list[GridRun] = []
    seen: dict[str, str] = {}
    used: tuple[set, set] = (set(), set())
    sections = SectionCache()
    resources_cache: dict[str, Resources] = {}
    combos = _expand(base, axes, overrides, excludes, dataclasses.asdict(base_resources), used)
    for values, spec_raw, resources_raw in combos:
        label = ", ".join(f"{k}={_raw_label(v)}" for k, v in values.items())
        try:
            built = sections.build(spec_raw, f"{where} [{label}]")
            resources = _resources(resources_cache, resources_raw, f"{where} [{label}]")
        except SpecError as err:
            raise GridError(str(err)) from None
        spec, h = built.spec, built.hash
        if h in seen:
            raise GridError(f"{where}: combinations [{seen[h]}] and [{label}] resolve to the same run (hash {h}); "
                            f"remove one or make them differ")
        seen[h] = label
        combination = {k: _axis_label(k, v, built.loss_label) for k, v in values.items()}
        runs.append(GridRun(spec, h, combination, resources, _role(built.view, claims)))
    _refuse_unused(where, overrides, excludes, used)
    if not runs:
        raise GridError(f"{where}: axes: the grid expands to zero runs (check 'axes' and 'exclude')")
    return Grid(name=name, path=path, runs=runs, resources=base_resources, claims=claims)


def _resources(cache: dict, raw: dict, where: str) -> Resources:
    """The job resources of ``raw`` (built once per distinct content; Resources is read-only by use)."""
    key = repr(sorted(raw.items(), key=lambda kv: kv[0]))
    if key not in cache:
        cache[key] = _build(Resources, raw, "resources", where)
    return cache[key]


def _raw_label(value: Any) -> Any:
    if isinstance(value, dict) and "name" in value and len(value) <= 2:
        return value["name"] if not value.get("params") else f"{value['name']}{value['params']}"
    return value

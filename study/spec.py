"""Run specification: typed schema, loading with validation, canonical form and identity hash.

A run spec is a YAML mapping with the sections ``data``, ``model``, ``loss``, ``train``,
``tracking`` and the scalar ``seed``. Every key is checked against the dataclasses below: unknown
keys, wrong types and values outside the allowed choices raise :class:`SpecError`, whose message
names the file, the dotted key path and the allowed values.

``spec_hash(spec)`` is the run's identity: SHA-256 of the canonical JSON of the resolved spec
(defaults filled in, keys sorted) without the fields in ``NON_IDENTITY_FIELDS``, which do not change
results (where things are stored, how many loader workers, logging cadence).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A run spec (or grid) is invalid; the message names file, key path and allowed values."""


# ----------------------------------------------------------------------------- schema


@dataclass
class TexDigitsSpec:
    num_train: int = 160
    num_val: int = 32
    num_test: int = 32
    height: int = 128
    width: int = 256
    profile: str = "synthia"
    seed: int = 0


@dataclass
class DataSpec:
    name: str = "texdigits"
    root: str = "data/texdigits"
    splits: dict = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    split_mode: str = "paper"
    split_seed: int = 0
    size: list[int] | None = None
    void: str = "train"
    class_counts: str = "train"
    mean: list[float] | None = None
    std: list[float] | None = None
    bgr: bool | None = None
    hflip: bool = False
    scale: list[float] | None = None
    crop: list[int] | None = None
    color_jitter: float = 0.0
    texdigits: TexDigitsSpec = field(default_factory=TexDigitsSpec)


@dataclass
class ModelSpec:
    arch: str = "deeplabv3plus"
    backbone: str = "resnet18"
    output_stride: int = 16
    pretrained: str | None = None


@dataclass
class LossSpec:
    name: str = "ce"
    params: dict = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class TrainSpec:
    iterations: int = 1000
    batch_size: int = 6
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: str = "constant"
    poly_power: float = 0.9
    eval_interval: int = 500
    eval_batch_size: int | None = None
    log_interval: int = 10
    checkpoint_interval: int | None = None
    workers: int = 0
    threads: int | None = None
    amp: bool = False
    device: str = "auto"
    num_overlays: int = 4


@dataclass
class TrackingSpec:
    experiment: str = "recall-study"
    uri: str = "sqlite:///mlflow.db"
    checkpoint_root: str = "checkpoints"
    log_checkpoint: bool = True


@dataclass
class RunSpec:
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 1337
    tracking: TrackingSpec = field(default_factory=TrackingSpec)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.split_mode": ("paper", "by_stream", "manifest"),
    "data.void": ("train", "ignore"),
    "data.class_counts": ("train", "val_first_image"),
    "data.texdigits.profile": ("synthia", "uniform"),
    "model.output_stride": ("8", "16", "32"),
    "train.optimizer.name": ("adam", "adamw", "sgd"),
    "train.schedule": ("constant", "poly"),
    "train.device": ("auto", "cpu", "cuda"),
}

#: Dotted paths that do not change results and so are not part of the identity hash.
NON_IDENTITY_FIELDS = (
    "data.root",
    "train.workers",
    "train.threads",
    "train.log_interval",
    "train.device",
    "train.num_overlays",
    "tracking",
)


# ----------------------------------------------------------------------------- coercion


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, where)
            except SpecError as err:
                errors.append(str(err))
        raise SpecError(f"{where}: key '{path}': expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: key '{path}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: key '{path}': expected a list of {_describe(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: key '{path}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: key '{path}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: key '{path}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: key '{path}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: key '{path}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    return typing.get_type_hints(cls), tuple(f.name for f in dataclasses.fields(cls))


def _build(cls: type, raw: dict, prefix: str, where: str) -> Any:
    hints, names = _schema(cls)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise SpecError(f"{where}: unknown key '{key}' (allowed: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in raw:
            path = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(raw[name], hints[name], path, where)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- validation


def _check_choice(value: Any, path: str, where: str) -> None:
    allowed = CHOICES[path]
    if str(value) not in allowed:
        raise SpecError(f"{where}: key '{path}': {value!r} is not one of: {', '.join(allowed)}")


@functools.cache
def _loss_parameters(name: str) -> tuple[tuple[str, ...], bool]:
    from study.losses import LOSSES

    signature = inspect.signature(LOSSES[name].__init__)
    allowed = tuple(p for p in signature.parameters if p not in ("self", "num_classes", "ignore_index", "class_counts"))
    return allowed, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def validate(spec: RunSpec, where: str = "<spec>") -> RunSpec:
    """Check choices and cross-field rules that the types alone cannot express."""
    from study.data import DATASETS
    from study.losses import LOSSES
    from study.models import MODEL_CHOICES

    for path in CHOICES:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part)
        _check_choice(value, path, where)

    if spec.data.name not in DATASETS:
        raise SpecError(f"{where}: key 'data.name': {spec.data.name!r} is not one of: {', '.join(DATASETS)}")
    for key in ("size", "crop"):
        v = getattr(spec.data, key)
        if v is not None and (len(v) != 2 or min(v) <= 0):
            raise SpecError(f"{where}: key 'data.{key}': expected [height, width] of positive integers, got {v}")
    if spec.data.scale is not None and (len(spec.data.scale) != 2 or not 0 < spec.data.scale[0] <= spec.data.scale[1]):
        raise SpecError(f"{where}: key 'data.scale': expected [min, max] with 0 < min <= max, got {spec.data.scale}")
    for key in ("mean", "std"):
        v = getattr(spec.data, key)
        if v is not None and len(v) != 3:
            raise SpecError(f"{where}: key 'data.{key}': expected 3 numbers (one per channel), got {v}")
    missing_splits = {"train", "val", "test"} - set(spec.data.splits)
    if missing_splits:
        raise SpecError(f"{where}: key 'data.splits': missing {sorted(missing_splits)} (needs train, val, test)")

    if spec.model.arch not in MODEL_CHOICES:
        raise SpecError(f"{where}: key 'model.arch': {spec.model.arch!r} is not one of: {', '.join(MODEL_CHOICES)}")
    backbones = MODEL_CHOICES[spec.model.arch]
    if spec.model.backbone not in backbones:
        raise SpecError(
            f"{where}: key 'model.backbone': {spec.model.backbone!r} is not available for arch "
            f"{spec.model.arch!r} (allowed: {', '.join(backbones)})"
        )

    if spec.loss.name not in LOSSES:
        raise SpecError(f"{where}: key 'loss.name': {spec.loss.name!r} is not one of: {', '.join(sorted(LOSSES))}")
    allowed, has_var_kw = _loss_parameters(spec.loss.name)
    for key in spec.loss.params:
        if key not in allowed and not has_var_kw:
            raise SpecError(
                f"{where}: key 'loss.params.{key}': not a parameter of loss {spec.loss.name!r} "
                f"(allowed: {', '.join(allowed) or 'none'})"
            )

    t = spec.train
    for key in ("iterations", "batch_size", "eval_interval", "log_interval"):
        if getattr(t, key) <= 0:
            raise SpecError(f"{where}: key 'train.{key}': must be positive, got {getattr(t, key)}")
    if t.optimizer.lr <= 0:
        raise SpecError(f"{where}: key 'train.optimizer.lr': must be positive, got {t.optimizer.lr}")
    if t.workers < 0:
        raise SpecError(f"{where}: key 'train.workers': must be >= 0, got {t.workers}")
    return spec


# ----------------------------------------------------------------------------- public API


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = 'a.b.c'``, creating mappings as needed."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: '{part}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.iterations=100", "loss.name=recall"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        set_path(out, key.strip(), yaml.safe_load(text))
    return out


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None


def from_dict(raw: dict, where: str = "<spec>") -> RunSpec:
    """Build and validate a RunSpec from a plain mapping."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a run spec must be a mapping, got {type(raw).__name__}")
    return validate(_build(RunSpec, raw, "", where), where)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Load a run spec YAML, apply ``--set`` overrides, validate."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a run spec must be a mapping, got {type(raw).__name__}")
    return from_dict(merge(raw, parse_overrides(overrides)), str(path))


def to_dict(spec: Any) -> Any:
    """Dataclasses -> plain dicts (lists and dicts copied); a faster ``dataclasses.asdict`` for specs."""
    kind = type(spec)
    fields = getattr(kind, "__dataclass_fields__", None)
    if fields is not None:
        return {name: to_dict(getattr(spec, name)) for name in fields}
    if kind is dict:
        return {k: to_dict(v) for k, v in spec.items()}
    if kind is list or kind is tuple:
        return [to_dict(v) for v in spec]
    return spec


def to_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=True)


def canonical(spec: RunSpec) -> dict:
    """The resolved spec without NON_IDENTITY_FIELDS (what the hash covers)."""
    raw = to_dict(spec)
    for dotted in NON_IDENTITY_FIELDS:
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return raw


def spec_hash(spec: RunSpec) -> str:
    """Stable 16-hex-digit identity of a run: sha256 of the canonical JSON."""
    text = json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {'a.b.c': value} (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def loss_label(spec: RunSpec) -> str:
    """The loss name plus the parameters that differ from its defaults: ``recall(ema=0.5)``.

    Tables group runs by this label, so variants of one loss stay apart.
    """
    from study.losses import LOSSES

    defaults = {name: p.default for name, p in inspect.signature(LOSSES[spec.loss.name].__init__).parameters.items()}
    changed = {k: v for k, v in sorted(spec.loss.params.items()) if defaults.get(k, inspect.Parameter.empty) != v}
    if not changed:
        return spec.loss.name
    return f"{spec.loss.name}(" + ",".join(f"{k}={v}" for k, v in changed.items()) + ")"


def run_name(spec: RunSpec) -> str:
    return f"{loss_label(spec)}/{spec.model.backbone}/{spec.data.name}/s{spec.seed}"

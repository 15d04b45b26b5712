"""Run specification: typed sections, loading with validation, canonical form and identity hash.

A run spec is a YAML mapping with the sections ``data``, ``model``, ``loss``, ``train``,
``tracking`` and the scalar ``seed``. The harness-wide fields are the dataclasses below; the
settings of each chosen component (the loss's parameters, the data set's own options, the
optimizer's and the schedule's) are owned by that component's entry (``study.components``) and
resolved through it. Every problem is a :class:`SpecError` whose message reads
``<file>: <dotted key>: <what is wrong> (allowed: ...)``.

Identity (``spec_hash``): SHA-256 of the canonical JSON of the run's *signature*: the resolved
settings that differ from their defaults (as Dora does), without the fields that do not change
results (``NON_IDENTITY_FIELDS``), with the settings of unchosen components left out, and with a
fingerprint of the data's content in place of its folder (``study.data.data_fingerprint``). So
equal runs spelled differently (``gamma: 2`` vs ``2.0`` vs left out) share one hash, the same spec
on other data is another run, and a new setting whose default keeps today's behaviour renames no
finished run. Changing a *default* changes what old runs mean: bump ``HASH_VERSION`` then.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from study.components import SettingError, coerce, describe

HASH_VERSION = 2


class SpecError(ValueError):
    """A run spec (or grid) is invalid; the message names file, key path and allowed values."""


def spec_error(where: str, err: SettingError, prefix: str = "") -> SpecError:
    """``SettingError`` -> ``SpecError`` reading ``where: prefix.key: what (allowed: ...)``."""
    e = err.under(prefix) if prefix else err
    return SpecError(f"{where}: {e}")


# ----------------------------------------------------------------------------- sections


@dataclass
class DataSpec:
    """Harness-wide data options; ``name`` picks the data set entry that owns the rest.

    The data set's own options (``texdigits``, ``void``, ``split_mode``, ``split_seed``, ``splits``)
    are written flat in this section, as before, and resolved by its entry (``study.data.DATASETS``);
    options of other data sets are refused.
    """

    name: str = "texdigits"
    root: str = "data/texdigits"
    size: list[int] | None = None
    class_counts: Literal["train", "val_first_image"] = "train"
    mean: list[float] | None = None
    std: list[float] | None = None
    bgr: bool | None = None
    hflip: bool = False
    scale: list[float] | None = None
    crop: list[int] | None = None
    color_jitter: float = 0.0
    scale_set: list[float] | None = None
    crop_small: Literal["pad", "upscale"] = "pad"
    augment_order: Literal["scale_crop_flip_jitter", "jitter_flip_scale_crop"] = "scale_crop_flip_jitter"
    jitter_arithmetic: Literal["float", "uint8_steps"] = "float"
    supervision: Literal["full", "scribble"] = "full"
    # owned by the data set entries (resolved there; the defaults of the chosen entry fill them)
    texdigits: dict | None = None
    void: str | None = None
    split_mode: str | None = None
    split_seed: int | None = None
    splits: dict | None = None


DATA_SET_KEYS = ("texdigits", "void", "split_mode", "split_seed", "splits")


@dataclass
class ModelSpec:
    arch: str = "deeplabv3plus"
    backbone: str = "resnet18"
    output_stride: int = 16
    pretrained: str | None = None
    decoder: Literal["smp", "official"] = "smp"


@dataclass
class LossSpec:
    name: str = "ce"
    params: dict = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    """``name`` picks the optimizer entry; ``momentum`` is a setting of ``sgd`` only."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float | None = None


@dataclass
class TrainSpec:
    """The loop's settings. GPU step options (``study.accel``): ``channels_last``, ``compile``
    (torch.compile of the model), ``fused_optimizer``, ``tf32``, ``cudnn_benchmark`` (fixed shapes),
    ``deterministic``; all off by default, which keeps the identity of existing runs; off CUDA they
    do nothing but ``channels_last`` and ``compile``."""

    iterations: int = 1000
    batch_size: int = 6
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: str = "constant"
    poly_power: float | None = None
    eval_interval: int = 500
    eval_batch_size: int | None = None
    log_interval: int = 10
    checkpoint_interval: int | None = None
    workers: int = 0
    threads: int | None = None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fused_optimizer: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_overlays: int = 4


@dataclass
class TrackingSpec:
    experiment: str = "recall-study"
    uri: str = "sqlite:///mlflow.db"
    checkpoint_root: str = "checkpoints"
    log_checkpoint: bool = True
    system_metrics: bool = False
    system_metrics_interval: float = 5.0


@dataclass
class RunSpec:
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 1337
    tracking: TrackingSpec = field(default_factory=TrackingSpec)


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


# ----------------------------------------------------------------------------- building


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    return typing.get_type_hints(cls), tuple(f.name for f in dataclasses.fields(cls))


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    """A dataclass from a mapping: unknown keys refused, values checked against the annotations."""
    if not isinstance(raw, dict):
        got = "nothing" if raw is None else f"{type(raw).__name__} {raw!r}"
        raise SpecError(f"{where}: {prefix or 'spec'}: expected a mapping, got {got}")
    hints, names = _schema(cls)
    unknown = sorted(set(raw) - set(names), key=str)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise SpecError(f"{where}: {key}: unknown key (allowed: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], path, where)
            continue
        try:
            kwargs[name] = coerce(raw[name], tp)
        except SettingError as err:
            raise SpecError(f"{where}: {path}: {err.what} (allowed: {err.allowed or describe(tp)})") from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------- validation


def _positive(where: str, path: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise SpecError(f"{where}: {path}: {value!r} is out of range (allowed: {allowed})")


def _check_train(t: TrainSpec, where: str) -> None:
    for key in ("iterations", "batch_size", "eval_interval", "log_interval"):
        _positive(where, f"train.{key}", getattr(t, key))
    for key in ("eval_batch_size", "checkpoint_interval", "threads"):
        _positive(where, f"train.{key}", getattr(t, key), allow_none=True)
    _positive(where, "train.workers", t.workers, minimum=0)
    _positive(where, "train.num_overlays", t.num_overlays, minimum=0)


def _check_seed(seed: int, where: str) -> None:
    if not 0 <= seed < 2**32:
        raise SpecError(f"{where}: seed: {seed} is out of range (allowed: an integer in [0, 2**32))")


EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
URI_SCHEMES = ("sqlite:///", "http://", "https://", "file:", "postgresql://", "mysql://")


def _check_tracking(t: TrackingSpec, where: str) -> None:
    if not EXPERIMENT_NAME.match(t.experiment):
        raise SpecError(f"{where}: tracking.experiment: {t.experiment[:60]!r} is not a valid name "
                        f"(allowed: 1-100 characters of letters, digits, '_', '.', '-', starting with a letter or digit)")
    if not (math.isfinite(t.system_metrics_interval) and t.system_metrics_interval > 0):
        raise SpecError(f"{where}: tracking.system_metrics_interval: {t.system_metrics_interval} is not allowed "
                        f"(allowed: a finite number > 0)")
    if not t.uri.startswith(URI_SCHEMES):
        raise SpecError(f"{where}: tracking.uri: {t.uri!r} has an unknown scheme (allowed: {', '.join(URI_SCHEMES)})")


def _resolve_data_section(data: DataSpec, where: str, data_name: str, check_files: bool) -> None:
    from study.data import resolve_data

    try:
        resolve_data(data, check_files)
    except SettingError as err:
        raise spec_error(where, err, "data") from None


def _resolve_model_section(model: ModelSpec, where: str, data_name: str, check_files: bool) -> None:
    from study.models import check_model

    if check_files:
        try:
            check_model(model)
        except SettingError as err:
            raise spec_error(where, err, "model") from None


def _resolve_train_section(train: TrainSpec, where: str, data_name: str, check_files: bool) -> None:
    from study.optim import resolve_optimizer, resolve_schedule

    for prefix, fn, arg in (("train.optimizer", resolve_optimizer, train.optimizer), ("train", resolve_schedule, train)):
        try:
            fn(arg)
        except SettingError as err:
            raise spec_error(where, err, prefix) from None
    if check_files:
        _check_train(train, where)


def _resolve_loss_section(loss: LossSpec, where: str, data_name: str, check_files: bool) -> None:
    """Fill the loss's defaults through its entry and run its own check for ``data_name``'s classes."""
    from study.data import num_classes_of
    from study.losses import LOSSES, check_loss

    entry = LOSSES.get(loss.name)
    try:
        if entry is None:
            raise SettingError("name", f"{loss.name!r} is not a known loss", ", ".join(LOSSES))
        loss.params = entry.resolve(loss.params)
        check_loss(loss.name, loss.params, num_classes_of(data_name))
    except SettingError as err:
        if err.key == "name":
            raise spec_error(where, err, "loss") from None
        key = err.key if err.key.startswith("params") else f"params.{err.key}"
        raise spec_error(where, SettingError(key, err.what, err.allowed), "loss") from None


def _resolve_tracking_section(tracking: TrackingSpec, where: str, data_name: str, check_files: bool) -> None:
    if check_files:
        _check_tracking(tracking, where)


#: section -> its resolver ``(section, where, data_name, check_files)``: fills the chosen component's
#: defaults in place and runs its checks (``check_files=False``, for the defaults a signature is a delta
#: from, skips what looks at the disk or at the combination of settings). Data comes first: the loss's
#: check needs the data set's class count.
SECTION_RESOLVERS = {
    "data": _resolve_data_section,
    "model": _resolve_model_section,
    "train": _resolve_train_section,
    "loss": _resolve_loss_section,
    "tracking": _resolve_tracking_section,
}


def _resolve_components(spec: RunSpec, where: str, check_files: bool = True) -> RunSpec:
    """Resolve every section through :data:`SECTION_RESOLVERS` (in place); returns ``spec``."""
    for section, resolve in SECTION_RESOLVERS.items():
        resolve(getattr(spec, section), where, spec.data.name, check_files)
    return spec


def validate(spec: RunSpec, where: str = "<spec>") -> RunSpec:
    """Resolve every component's settings and check the harness-wide rules; returns ``spec``."""
    _resolve_components(spec, where)
    _check_seed(spec.seed, where)
    return spec


# ----------------------------------------------------------------------------- public API


def plain_copy(value: Any) -> Any:
    """A copy of YAML data (dicts, lists, scalars): what ``copy.deepcopy`` does, several times faster."""
    if type(value) is dict:
        return {k: plain_copy(v) for k, v in value.items()}
    if type(value) is list:
        return [plain_copy(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else copy.deepcopy(value)


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = plain_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = merge(out[key], value)
        else:
            out[key] = plain_copy(value)
    return out


def set_path(raw: dict, dotted: str, value: Any, where: str = "--set", copy_on_write: bool = False) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = 'a.b.c'``, creating mappings as needed.

    ``copy_on_write``: each mapping on the path is replaced by a copy before it is written, so mappings
    that ``raw`` shares with other data (a grid's base) are never changed."""
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"{where}: {dotted!r}: not a dotted key path (allowed: e.g. train.iterations)")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where}: {dotted}: '{part}' is not a mapping")
        if copy_on_write:
            child = node[part] = dict(child)
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.iterations=100", "loss.name=recall"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SpecError(f"--set {item!r}: {text!r} is not a YAML value") from None
        set_path(out, key.strip(), value, f"--set {item!r}")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _safe_unique_load(text: str):
    """One YAML document through the safe loader that refuses duplicate keys."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader; syntax errors, duplicate keys and bad bytes name the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return _safe_unique_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None


def from_dict(raw: dict, where: str = "<spec>") -> RunSpec:
    """Build and validate a RunSpec from a plain mapping."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: spec: expected a mapping, got {type(raw).__name__}")
    return validate(_build(RunSpec, raw, "", where), where)  # _build copies every value it keeps


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Load a run spec YAML, apply ``--set`` overrides, validate. An empty file is an error."""
    raw = read_yaml(path)
    if raw is None:
        raise SpecError(f"{path}: spec: the file is empty (allowed: a mapping with sections "
                        f"data, model, loss, train, tracking, seed)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: spec: expected a mapping, got {type(raw).__name__}")
    extra = parse_overrides(overrides)
    where = str(path) if not overrides else f"{path} with --set {' '.join(overrides)}"
    return from_dict(merge(raw, extra), where)


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


# ----------------------------------------------------------------------------- identity


def _drop(raw: dict, dotted: str) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part, {})
    node.pop(parts[-1], None)


def _delta(values: Any, defaults: Any) -> Any:
    """The parts of ``values`` that differ from ``defaults`` (mappings recurse; None = no difference)."""
    if isinstance(values, dict) and isinstance(defaults, dict):
        out = {}
        for key, value in values.items():
            if key not in defaults:
                out[key] = value
                continue
            d = _delta(value, defaults[key])
            if d is not None:
                out[key] = d
        return out or None
    return None if values == defaults else values


@functools.lru_cache(maxsize=256)
def _defaults_for(choice: tuple) -> dict:
    """The resolved default spec for a choice of components (what a signature is a delta from)."""
    data_name, loss_name, optimizer, schedule, arch = choice
    raw = {"data": {"name": data_name}, "loss": {"name": loss_name}, "model": {"arch": arch},
           "train": {"optimizer": {"name": optimizer}, "schedule": schedule}}
    spec = _build(RunSpec, raw, "", "<defaults>")
    return to_dict(_resolve_components(spec, "<defaults>", check_files=False))


#: The sections whose settings make a run's identity (``tracking`` only says where things are kept).
IDENTITY_SECTIONS = ("data", "model", "loss", "train")
_NAME_KEYS = {"data": "name", "loss": "name", "model": "arch", "train": "schedule"}
DEFAULT_SEED = 1337


def choice_of(spec: RunSpec) -> tuple:
    """The chosen components: what the defaults a signature is a delta from depend on."""
    return spec.data.name, spec.loss.name, spec.train.optimizer.name, spec.train.schedule, spec.model.arch


def section_signature(section: str, values: dict, choice: tuple) -> dict:
    """One identity section's share of the signature: its settings (``values``, resolved, as plain
    data; not modified) that differ from the defaults of ``choice``, identity fields only, plus the
    name of the chosen component."""
    values, defaults = plain_copy(values), plain_copy(_defaults_for(choice)[section])
    for dotted in NON_IDENTITY_FIELDS:
        head, _, rest = dotted.partition(".")
        if head == section and rest:
            _drop(values, rest)
            _drop(defaults, rest)
    delta = _delta(values, defaults) or {}
    if section == "loss":
        from study.losses import LOSSES

        for key in LOSSES[values["name"]].extra.get("non_identity", ()):
            delta.get("params", {}).pop(key, None)
        if not delta.get("params", True):
            delta.pop("params")
    delta[_NAME_KEYS[section]] = values[_NAME_KEYS[section]]
    if section == "train":
        delta.setdefault("optimizer", {})["name"] = values["optimizer"]["name"]
    return delta


def signature(spec: RunSpec) -> dict:
    """The run's settings that differ from the defaults of its chosen components, identity fields only
    (the seed when it is not the default)."""
    choice = choice_of(spec)
    out: dict[str, Any] = {s: section_signature(s, to_dict(getattr(spec, s)), choice) for s in IDENTITY_SECTIONS}
    if spec.seed != DEFAULT_SEED:
        out["seed"] = spec.seed
    return out


def canonical(spec: RunSpec) -> dict:
    """What the hash covers: the signature plus the fingerprint of the data's content."""
    from study.data import data_fingerprint

    out = signature(spec)
    out["data"]["content"] = data_fingerprint(spec.data)
    out["version"] = HASH_VERSION
    return out


def spec_hash(spec: RunSpec) -> str:
    """Stable 16-hex-digit identity of a run: sha256 of the canonical JSON."""
    return hash_of(canonical(spec))


def hash_of(canonical_form: dict) -> str:
    """sha256 of a canonical form's JSON (sorted keys, no spaces), first 16 hex digits."""
    text = json.dumps(canonical_form, sort_keys=True, separators=(",", ":"))
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


def _format(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return repr(value)
    return str(value)


def loss_label(spec: RunSpec) -> str:
    """The loss name plus the resolved parameters that differ from its defaults: ``recall(ema=0.5)``."""
    from study.losses import LOSSES

    entry = LOSSES[spec.loss.name]
    changed = {k: v for k, v in entry.changed(spec.loss.params).items() if k not in entry.extra.get("non_identity", ())}
    if not changed:
        return spec.loss.name
    return f"{spec.loss.name}(" + ",".join(f"{k}={_format(v)}" for k, v in sorted(changed.items())) + ")"


def run_name(spec: RunSpec) -> str:
    return f"{loss_label(spec)}/{spec.model.backbone}/{spec.data.name}/s{spec.seed}"

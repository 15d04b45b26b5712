"""Component entries: one record per loss, data set, model, optimizer and schedule.

A component's settings are the keyword parameters of its ``build`` callable: the signature is the
schema (name, type annotation, default), as in segmentation_models_pytorch. ``Component.resolve``
turns the mapping a user wrote into the complete, canonical settings of the component:

- unknown keys are refused, naming the allowed ones;
- each value is checked against its annotation (``bool`` is only ``true``/``false``, never a string;
  ``float`` takes integers and numeric strings and must be finite; ``int`` refuses floats; a
  ``Literal[...]`` names its allowed values) and converted (``2`` -> ``2.0`` for a float), so two
  spellings of the same setting resolve to the same value;
- defaults fill what was not written;
- the entry's ``check`` refuses what the component cannot run (cross-field rules, ranges), and a
  loss's own constructor validation runs once at load time (see ``study.losses``).

Errors are :class:`SettingError` (key, value, what is allowed); the spec loader prefixes the file
and the dotted path, giving ``error: <file>: <key>: <what> (allowed: ...)``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

#: What a component may need from the run, beside its settings.
NEEDS = ("class_counts", "image", "features", "train_masks")


class SettingError(ValueError):
    """A setting is invalid: ``key`` (relative to the component), ``what`` is wrong, ``allowed`` values."""

    def __init__(self, key: str, what: str, allowed: str | None = None):
        self.key, self.what, self.allowed = key, what, allowed
        super().__init__(f"{key}: {what}" + (f" (allowed: {allowed})" if allowed else ""))

    def under(self, prefix: str) -> "SettingError":
        """The same error with ``prefix.`` in front of its key."""
        return SettingError(f"{prefix}.{self.key}" if prefix else self.key, self.what, self.allowed)


# ----------------------------------------------------------------------------- values


def describe(tp: Any) -> str:
    """Human description of an annotation, used as the 'allowed' part of a message."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is float:
        return "a finite number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
        args = typing.get_args(tp)
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, typing.Mapping, collections.abc.Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def canonical_value(value: Any) -> Any:
    """A value without a declared type, made canonical: integral floats become ints, containers recurse."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical_value(dataclasses.asdict(value))
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SettingError("", f"{value!r} is not a finite number")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    return value


def _as_float(value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise SettingError("", f"{value!r} is not a number", "a finite number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError("", f"{value!r} is not a number", "a finite number")
    out = float(value)
    if not math.isfinite(out):
        raise SettingError("", f"{value!r} is not a finite number", "a finite number")
    return out


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError("", f"{value!r} is not a boolean", "true or false")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError("", f"{value!r} is not an integer", "an integer")
    if abs(value) >= 2**63:
        raise SettingError("", f"{value} is out of range", "an integer below 2**63")
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError("", f"{value!r} is not a string", "a string")
    return value


_SIMPLE = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and return its canonical form; SettingError (key '')."""
    simple = _SIMPLE.get(tp)
    if simple is not None:
        return simple(value)
    if tp is inspect.Parameter.empty or tp is Any:
        return canonical_value(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SettingError("", f"{value!r} is not a mapping", "a mapping")
        return Component(tp.__name__, tp, check=getattr(tp, "check", None)).resolve(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SettingError("", "null is not allowed", describe(tp))
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except SettingError:
                continue
        raise SettingError("", f"{value!r} is not allowed", describe(tp))
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed) or (
                    isinstance(allowed, int) and not isinstance(value, bool) and value == allowed):
                return allowed
        raise SettingError("", f"{value!r} is not allowed", describe(tp))
    if origin in (list, tuple) or origin is typing.Sequence or origin is collections.abc.Sequence:
        if not isinstance(value, (list, tuple)):
            raise SettingError("", f"{value!r} is not a list", describe(tp))
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [coerce(v, item) for v in value]
    if tp is dict or origin in (dict,) or origin is collections.abc.Mapping:
        if not isinstance(value, Mapping):
            raise SettingError("", f"{value!r} is not a mapping", "a mapping")
        return canonical_value(dict(value))
    return canonical_value(value)


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Component:
    """One buildable part of a run.

    ``build``: the factory; its keyword parameters other than ``supplied`` are the settings.
    ``supplied``: parameters the run fills in at build time (``num_classes``, ``class_counts``, ...).
    ``needs``: what the trainer must hand over (subset of :data:`NEEDS`).
    ``check``: ``check(settings) -> None`` raising SettingError for what the component cannot run.
    ``what`` / ``notes``: the one-line description used by the README's tables.
    """

    name: str
    build: Callable[..., Any]
    supplied: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    check: Callable[[dict], None] | None = None
    what: str = ""
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The settings (name -> inspect.Parameter) in signature order."""
        return _parameters(self.build, self.supplied)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.parameters().items() if p.default is not inspect.Parameter.empty}

    def resolve(self, raw: Mapping[str, Any] | None) -> dict[str, Any]:
        """Complete, canonical settings from what was written; SettingError with a relative key."""
        raw = dict(raw or {})
        params = self.parameters()
        unknown = sorted(set(raw) - set(params))
        if unknown:
            raise SettingError(unknown[0], f"not a setting of {self.name!r}", ", ".join(params) or "none")
        out: dict[str, Any] = {}
        for key, p in params.items():
            if key in raw:
                try:
                    out[key] = coerce(raw[key], _hint(self.build, key, p))
                except SettingError as err:
                    raise SettingError(f"{key}.{err.key}" if err.key else key, err.what, err.allowed) from None
            elif p.default is inspect.Parameter.empty:
                raise SettingError(key, f"is required by {self.name!r}")
            else:
                out[key] = _default(self.build, key, p)
        if self.check is not None:
            self.check(out)
        return out

    def changed(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings that differ from the defaults (the component's part of a run's signature)."""
        params = self.parameters()
        defaults = {k: _default(self.build, k, params[k]) for k in self.defaults()}
        return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}


_PARAM_CACHE: dict[tuple, dict[str, inspect.Parameter]] = {}
_HINT_CACHE: dict[tuple, Any] = {}


def _parameters(fn: Callable, supplied: tuple[str, ...]) -> dict[str, inspect.Parameter]:
    key = (fn, supplied)
    if key not in _PARAM_CACHE:
        target = fn.__init__ if inspect.isclass(fn) else fn
        sig = inspect.signature(target)
        _PARAM_CACHE[key] = {
            k: p for k, p in sig.parameters.items()
            if k not in ("self", *supplied) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
    return _PARAM_CACHE[key]


def _hint(fn: Callable, key: str, p: inspect.Parameter) -> Any:
    cache_key = (fn, key)
    if cache_key not in _HINT_CACHE:
        target = fn.__init__ if inspect.isclass(fn) else fn
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # noqa: BLE001 - an unresolvable annotation falls back to the raw one
            hints = {}
        _HINT_CACHE[cache_key] = hints.get(key, p.annotation)
    return _HINT_CACHE[cache_key]


def _default(fn: Callable, key: str, p: inspect.Parameter) -> Any:
    """A parameter's default in canonical form (typed like a written value would be)."""
    value = p.default
    if isinstance(value, tuple):
        value = list(value)
    try:
        return coerce(value, _hint(fn, key, p))
    except SettingError:
        return canonical_value(value)


def lookup(registry: Mapping[str, Component], name: Any, kind: str) -> Component:
    """``registry[name]`` or a SettingError naming the allowed names (key 'name')."""
    if not isinstance(name, str) or name not in registry:
        raise SettingError("name", f"{name!r} is not a known {kind}", ", ".join(registry))
    return registry[name]

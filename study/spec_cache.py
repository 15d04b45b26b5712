"""Many run specs that share sections (a grid's combinations), built once per distinct section.

A grid of 10,000 combinations has only a handful of distinct ``data``, ``model``, ``loss``, ``train``
and ``tracking`` sections (the axis values). :class:`SectionCache` types, resolves and checks each
distinct section once (by its YAML content; the loss also by the data set, whose class count its
check needs), and keeps its resolved plain form and its share of the signature
(``study.spec.section_signature``). Building a spec is then: look up five sections, copy them into a
fresh :class:`~study.spec.RunSpec`, assemble the canonical form and hash it.

Contract: ``build(raw, where)`` gives the spec and hash that ``from_dict(raw, where)`` and
``spec_hash`` give (a test compares them on every grid of the repository). Whatever the fast path
cannot take (unknown keys, a bad value, anything unusual) goes through ``from_dict``, so an error
reads exactly as ``load_spec`` would report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from study.components import SettingError, coerce
from study.spec import (DEFAULT_SEED, HASH_VERSION, IDENTITY_SECTIONS, SECTION_RESOLVERS, RunSpec, SpecError,
                        _build, _check_seed, _schema, choice_of, from_dict, hash_of, loss_label, plain_copy,
                        section_signature, spec_hash, to_dict)

_ABSENT = object()


@dataclass
class BuiltSpec:
    """One combination: its spec (own objects), hash, loss label and resolved view.

    ``view`` holds the resolved settings as plain data, the loss section extended with ``label`` and
    ``params.<name>`` keys (what grid ``claims`` selectors match); its sections are shared between
    specs: read it, never change it."""

    spec: RunSpec
    hash: str
    loss_label: str
    view: dict


class SectionCache:
    """Resolved sections, signatures, data fingerprints and loss labels, keyed by section content."""

    def __init__(self) -> None:
        self._sections: dict[tuple, tuple[Any, dict]] = {}
        self._signatures: dict[tuple, dict] = {}
        self._fingerprints: dict[tuple, str] = {}
        self._loss_views: dict[tuple, tuple[str, dict]] = {}

    def build(self, raw: Any, where: str) -> BuiltSpec:
        """The spec of ``raw`` (a plain mapping, as ``from_dict`` takes) with its hash; SpecError if invalid."""
        names = _schema(RunSpec)[1]
        if type(raw) is dict and not set(raw) - set(names):
            try:
                return self._fast(raw, where)
            except (SpecError, SettingError, ValueError, TypeError):
                pass  # the reference path below reports the problem as load_spec does
        spec = from_dict(raw, where)
        label = loss_label(spec)
        return BuiltSpec(spec, spec_hash(spec), label, _view(to_dict(spec), label))

    def _fast(self, raw: dict, where: str) -> BuiltSpec:
        data, data_key, data_plain = self._section("data", raw, where, None)
        parts = {"data": data}
        keys = {"data": data_key}
        plains = {"data": data_plain}
        for name in ("model", "train", "loss", "tracking"):
            parts[name], keys[name], plains[name] = self._section(name, raw, where, data.name)
        seed = coerce(raw.get("seed", DEFAULT_SEED), int)
        _check_seed(seed, where)
        spec = RunSpec(seed=seed, **{name: _fresh(obj) for name, obj in parts.items()})
        choice = choice_of(spec)
        canon: dict[str, Any] = {s: dict(self._signature(s, keys[s], plains[s], choice)) for s in IDENTITY_SECTIONS}
        if seed != DEFAULT_SEED:
            canon["seed"] = seed
        canon["data"]["content"] = self._fingerprint(data_key, data)
        canon["version"] = HASH_VERSION
        label, loss_view = self._loss_view(keys["loss"], spec, plains["loss"])
        view = {**plains, "loss": loss_view, "seed": seed}
        return BuiltSpec(spec, hash_of(canon), label, view)

    def _section(self, name: str, raw: dict, where: str, data_name: str | None) -> tuple[Any, tuple, dict]:
        """(resolved section object, content key, plain form); resolved once per key."""
        value = raw.get(name, _ABSENT)
        # repr of YAML data (dicts, lists, str, int, float, bool, None) tells equal content from unequal
        # (1, 1.0 and True differ); mappings written in another key order just miss the cache
        text = "absent" if value is _ABSENT else repr(value)
        key = (name, text, data_name if name == "loss" else None)
        hit = self._sections.get(key)
        if hit is None:
            cls = _schema(RunSpec)[0][name]
            obj = _build(cls, {} if value is _ABSENT else value, name, where)
            SECTION_RESOLVERS[name](obj, where, obj.name if name == "data" else data_name, True)
            hit = self._sections[key] = (obj, to_dict(obj))
        return hit[0], key, hit[1]

    def _signature(self, section: str, key: tuple, plain: dict, choice: tuple) -> dict:
        sig_key = (key, choice)
        hit = self._signatures.get(sig_key)
        if hit is None:
            hit = self._signatures[sig_key] = section_signature(section, plain, choice)
        return hit

    def _fingerprint(self, key: tuple, data: Any) -> str:
        hit = self._fingerprints.get(key)
        if hit is None:
            from study.data import data_fingerprint

            hit = self._fingerprints[key] = data_fingerprint(data)
        return hit

    def _loss_view(self, key: tuple, spec: RunSpec, plain: dict) -> tuple[str, dict]:
        hit = self._loss_views.get(key)
        if hit is None:
            label = loss_label(spec)
            hit = self._loss_views[key] = (label, _view({"loss": plain}, label)["loss"])
        return hit


def _view(plain: dict, label: str) -> dict:
    """``plain`` with the loss section extended by ``label`` and ``params.<name>`` keys."""
    loss = dict(plain["loss"])
    loss["label"] = label
    loss.update({f"params.{k}": v for k, v in plain["loss"]["params"].items()})
    return {**plain, "loss": loss}


def _fresh(obj: Any) -> Any:
    """A copy of a resolved section: its own dataclass objects, dicts and lists; scalars shared."""
    new = object.__new__(type(obj))
    fields = new.__dict__
    fields.update(obj.__dict__)
    for name, value in fields.items():
        kind = type(value)
        if kind is dict or kind is list:
            fields[name] = plain_copy(value)
        elif kind in _SECTION_TYPES:
            fields[name] = _fresh(value)
    return new


#: the dataclasses a section can hold (a section's nested records: ``train.optimizer``)
_SECTION_TYPES = frozenset(t for t in _schema(RunSpec)[0].values() if hasattr(t, "__dataclass_fields__")) | frozenset(
    t for section in _schema(RunSpec)[0].values() if isinstance(section, type) and hasattr(section, "__dataclass_fields__")
    for t in _schema(section)[0].values() if isinstance(t, type) and hasattr(t, "__dataclass_fields__"))

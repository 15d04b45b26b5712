"""Optimizer and learning-rate schedule entries: settings, checks and builders.

Spec layout (unchanged YAML): ``train.optimizer: {name, lr, weight_decay, momentum}`` and
``train.schedule`` with ``train.poly_power``. Each optimizer/schedule owns its settings: ``momentum``
belongs to ``sgd`` only, ``poly_power`` to ``poly`` only; writing one for another choice is refused.

- ``adam`` / ``adamw``: ``torch.optim.Adam`` / ``AdamW`` (lr, weight_decay).
- ``sgd``: ``torch.optim.SGD`` (lr, momentum 0.9, weight_decay).
- ``constant``: lr at every iteration; ``poly``: lr * (1 - it / iterations) ** poly_power.
"""

from __future__ import annotations

import math

import torch

from study.components import Component, SettingError, lookup


def _finite(key: str, value: float, low: float, low_inclusive: bool, high: float = math.inf) -> None:
    ok = (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if high != math.inf else "")
        raise SettingError(key, f"{value!r} is out of range", f"a finite number {bound}")


def _adam_settings(lr: float = 1e-3, weight_decay: float = 0.0) -> None:
    """Adam / AdamW settings."""


def _sgd_settings(lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
    """SGD settings."""


def _check_optimizer(s: dict) -> None:
    _finite("lr", s["lr"], 0.0, False)
    _finite("weight_decay", s["weight_decay"], 0.0, True)
    if "momentum" in s:
        _finite("momentum", s["momentum"], 0.0, True, 1.0)


OPTIMIZERS: dict[str, Component] = {
    "adam": Component("adam", _adam_settings, check=_check_optimizer, extra={"cls": torch.optim.Adam}),
    "adamw": Component("adamw", _adam_settings, check=_check_optimizer, extra={"cls": torch.optim.AdamW}),
    "sgd": Component("sgd", _sgd_settings, check=_check_optimizer, extra={"cls": torch.optim.SGD}),
}


def _constant_settings() -> None:
    """No settings."""


def _poly_settings(poly_power: float = 0.9) -> None:
    """Polynomial decay power."""


def _check_poly(s: dict) -> None:
    _finite("poly_power", s["poly_power"], 0.0, False)


SCHEDULES: dict[str, Component] = {
    "constant": Component("constant", _constant_settings),
    "poly": Component("poly", _poly_settings, check=_check_poly),
}


def resolve_optimizer(opt) -> None:
    """Resolve ``train.optimizer`` in place through its entry (SettingError keyed relative to it)."""
    entry = lookup(OPTIMIZERS, opt.name, "optimizer")
    written = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.momentum is not None:
        written["momentum"] = opt.momentum
    settings = entry.resolve(written)
    opt.lr, opt.weight_decay, opt.momentum = settings["lr"], settings["weight_decay"], settings.get("momentum")


def resolve_schedule(train) -> None:
    """Resolve ``train.schedule`` / ``train.poly_power`` in place (SettingError keyed relative to ``train``)."""
    try:
        entry = lookup(SCHEDULES, train.schedule, "schedule")
    except SettingError as err:
        raise SettingError("schedule", err.what, err.allowed) from None
    written = {} if train.poly_power is None else {"poly_power": train.poly_power}
    settings = entry.resolve(written)
    train.poly_power = settings.get("poly_power")


def build_optimizer(opt, params, extra: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer of a resolved ``train.optimizer`` section over ``params`` (``extra``: e.g. fused)."""
    cls = OPTIMIZERS[opt.name].extra["cls"]
    kwargs = {"lr": opt.lr, "weight_decay": opt.weight_decay, **(extra or {})}
    if opt.momentum is not None:
        kwargs["momentum"] = opt.momentum
    return cls(params, **kwargs)


def build_scheduler(train, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """constant: lr; poly: lr * (1 - it / iterations) ** poly_power (never below 0)."""
    total, power = train.iterations, train.poly_power
    if train.schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / total) ** power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)

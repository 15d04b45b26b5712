"""Bad input: each mistake gives one clear message naming the file and the key, before anything is
submitted where possible, and leaves the runs already in the store untouched."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.data.synthia import synthia_samples
from study.data.texdigits import TexDigitsParams, ensure_texdigits
from study.launch import launch
from study.spec import SpecError

from .helpers import file_digest, python_env, quiet, small_spec, write_grid


class Store:
    """A sqlite store holding one finished run, shared by the module's cases."""

    def __init__(self, root: Path):
        self.root = root
        self.db = root / "mlflow.db"
        self.base = small_spec(root, train={"iterations": 2, "eval_interval": 2, "log_interval": 1})
        self.client = MlflowClient(f"sqlite:///{self.db}")

    def snapshot(self) -> list[tuple]:
        exp = self.client.get_experiment_by_name("tests")
        return sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())),
                       tuple(sorted(r.data.params.items())), tuple(sorted(r.data.metrics.items())))
                      for r in self.client.search_runs([exp.experiment_id]))

    def spec(self, **sections) -> dict:
        raw = copy.deepcopy(self.base)
        for key, value in sections.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
        if raw["data"].get("name") != "texdigits":  # the generator's settings belong to texdigits only
            raw["data"].pop("texdigits", None)
        return raw

    def data_variant(self, seed: int) -> dict:
        """A texdigits variant in its own folder (safe to damage); returns its split -> [(image, label)]."""
        params = TexDigitsParams.from_spec({**self.base["data"]["texdigits"], "seed": seed})
        return synthia_samples(ensure_texdigits(Path(self.base["data"]["root"]), params), "manifest", 0)[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("store"))
    path = write_grid(s.root / "ok.yaml", s.base, {"seed": [1]}, name="ok")
    assert not launch(path, executor="debug", folder_root=s.root / "submitit", log=quiet)["failed"]
    (run,) = [r for r in s.snapshot() if dict(r[3]).get("study.spec_hash")]
    assert run[1] == "FINISHED"
    return s


def refused_before_submission(store: Store, tmp_path: Path, grid: Path, key: str, *fragments: str) -> str:
    """launch() raises a one-line SpecError naming the grid file and ``key``; the store is byte-identical."""
    before = file_digest(store.db)
    with pytest.raises(SpecError) as err:
        launch(grid, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(grid) in message and f"{key}:" in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert file_digest(store.db) == before, "the store was written to"
    assert not (tmp_path / "submitit").exists()
    return message


# ----------------------------------------------------------------------------- through the CLI


def _cli_cases(root: Path, store: Store) -> dict[str, tuple[Path, str, str]]:
    """name -> (grid file, key or phrase the message must name, extra fragment)."""
    cases = {}
    p = root / "malformed.yaml"
    p.write_text("name: bad\nbase:\n  train: {iterations: 2\naxes: {seed: [1]}\n")
    cases["malformed YAML"] = (p, "malformed YAML", "line")
    p = write_grid(root / "unknown_key.yaml", store.spec(train={"iteratons": 5}), {"seed": [1]})
    cases["unknown key"] = (p, "train.iteratons: unknown key", "allowed:")
    synthia = {**copy.deepcopy(store.base), "data": {"name": "synthia", "root": str(root / "nowhere")}}
    p = write_grid(root / "missing_root.yaml", synthia, {"seed": [1]})
    cases["missing data root"] = (p, "data.root:", "does not exist")
    p = write_grid(root / "zero_runs.yaml", store.base, {"seed": [1, 2]}, exclude=[{"seed": [1, 2]}])
    cases["grid with zero runs after excludes"] = (p, "zero runs", "exclude")
    return cases


@pytest.fixture(scope="module")
def cli_results(store, tmp_path_factory):
    """`study launch BAD.yaml --executor debug` for every CLI case, run side by side (each start costs ~5 s)."""
    root = tmp_path_factory.mktemp("cli")
    cases = _cli_cases(root, store)
    before = file_digest(store.db)
    procs = {name: subprocess.Popen([sys.executable, "-m", "study", "launch", str(path), "--executor", "debug"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                    env=python_env())
             for name, (path, _, _) in cases.items()}
    out = {name: (cases[name], p.wait(300), *p.communicate()) for name, p in procs.items()}
    return out, before == file_digest(store.db), root


CLI_CASES = ["malformed YAML", "unknown key", "missing data root", "grid with zero runs after excludes"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_launch_refuses_bad_grid(cli_results, case):
    """`study launch BAD.yaml`: exit 2, one `error:` line naming file and key, store untouched"""
    results, store_unchanged, root = cli_results
    (path, key, extra), rc, stdout, stderr = results[case]
    assert rc == 2, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert str(path) in errors[0] and key in errors[0] and extra in errors[0], errors[0]
    assert lines == errors, f"stderr holds more than the one error line: {stderr}"
    assert store_unchanged and not (root / "submitit").exists()


# ----------------------------------------------------------------------------- through the Python API


def test_wrong_type(store, tmp_path):
    """wrong type (train.iterations: "ten") is refused before submission, naming file and key"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(train={"iterations": "ten"}), {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "train.iterations", "is not an integer")


def test_unknown_loss(store, tmp_path):
    """unknown loss in one combination is refused, naming file, combination and key, allowed values listed"""
    grid = write_grid(tmp_path / "g.yaml", store.base, {"loss": ["ce", "hinge"]})
    refused_before_submission(store, tmp_path, grid, "loss.name", "[loss=hinge]", "recall")


def test_unknown_loss_parameter(store, tmp_path):
    """misspelt loss parameter (focal gama) is refused, naming the key and the allowed parameters"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(loss={"name": "focal", "params": {"gama": 2}}), {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "loss.params.gama", "gamma")


def test_unknown_backbone(store, tmp_path):
    """backbone not available for the arch is refused, naming file and key"""
    grid = write_grid(tmp_path / "g.yaml", store.base, {"model.backbone": ["resnet9"]})
    refused_before_submission(store, tmp_path, grid, "model.backbone", "mobilenet_v3_small")


def test_unknown_dataset(store, tmp_path):
    """unknown data set name is refused, naming file and key"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(data={"name": "kitti"}), {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "data.name", "cityscapes")


def test_bad_resources(store, tmp_path):
    """wrong type in the grid's resources is refused, naming file and key"""
    grid = write_grid(tmp_path / "g.yaml", store.base, {"seed": [1]})
    raw = yaml.safe_load(grid.read_text())
    raw["resources"]["cpus"] = "two"
    grid.write_text(yaml.safe_dump(raw))
    refused_before_submission(store, tmp_path, grid, "resources.cpus", "is not an integer")


def test_missing_pretrained_weights(store, tmp_path):
    """model.pretrained naming a missing file is refused before submission (pre-flight), naming the key"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(model={"arch": "lraspp", "backbone": "mobilenet_v3_small",
                                                             "pretrained": str(tmp_path / "w.pth")}), {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "model.pretrained", "w.pth")


def test_empty_split(store, tmp_path):
    """a data root whose validation split is empty is refused before submission (pre-flight)"""
    seq = Path(store.data_variant(seed=21)["train"][0][0]).parents[3]  # .../SYNTHIA-SEQS-05-SUMMER
    manifest = json.loads((seq / "splits.json").read_text())
    manifest["val"] = []
    (seq / "splits.json").write_text(json.dumps(manifest))
    raw = {**copy.deepcopy(store.base), "data": {"name": "synthia", "root": str(seq), "split_mode": "manifest"}}
    grid = write_grid(tmp_path / "g.yaml", raw, {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "data.root", "'val'", "empty")


@pytest.mark.parametrize("axis", [{"seed": [1, 2, 1]}, {"train.log_interval": [1, 2]}],
                         ids=["same value twice", "values differing only in a non-identity field"])
def test_duplicate_runs(store, tmp_path, axis):
    """two combinations resolving to the same run (spec hash) are refused, naming both"""
    grid = write_grid(tmp_path / "g.yaml", store.base, axis)
    message = None
    before = file_digest(store.db)
    with pytest.raises(SpecError) as err:
        launch(grid, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    message = str(err.value)
    assert str(grid) in message and "resolve to the same run" in message and "\n" not in message
    assert file_digest(store.db) == before


def _set_label(path: str, value: int) -> None:
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    raw[0, 0, 2] = value  # class id channel (R in OpenCV's BGR order)
    assert cv2.imwrite(path, raw)


def failed_at_run_time(store: Store, tmp_path: Path, grid: Path) -> str:
    """Launch; the one run must be FAILED with a reason, the finished run already there untouched."""
    before = store.snapshot()
    summary = launch(grid, executor="debug", folder_root=tmp_path / "submitit", log=quiet)
    assert len(summary["failed"]) == 1
    after = store.snapshot()
    assert set(before) <= set(after), "an existing run changed"
    (new,) = [r for r in set(after) - set(before) if "study.spec_hash" in dict(r[3])]
    assert new[1] == "FAILED"
    return dict(new[3])["study.failure"]


def test_label_ids_outside_class_range(store, tmp_path):
    """a validation label holding id 200 (not 255) fails the run at evaluation, the reason naming the file"""
    samples = store.data_variant(seed=22)
    label = samples["val"][0][1]
    _set_label(label, 200)
    grid = write_grid(tmp_path / "g.yaml", store.spec(data={"texdigits": {**store.base["data"]["texdigits"],
                                                                          "seed": 22}}), {"seed": [1]})
    reason = failed_at_run_time(store, tmp_path, grid)
    assert label in reason and "[200]" in reason and "outside 0..15" in reason


def test_labels_exceed_model_classes(store, tmp_path):
    """class count mismatch: a training label with id 16 for a 16-output model is refused before submission
    (the launcher's one pass over the training labels), naming the grid, data.root and the label file"""
    samples = store.data_variant(seed=23)
    label = samples["train"][-1][1]
    _set_label(label, 16)
    grid = write_grid(tmp_path / "g.yaml", store.spec(data={"texdigits": {**store.base["data"]["texdigits"],
                                                                          "seed": 23}}), {"seed": [1]})
    refused_before_submission(store, tmp_path, grid, "data.root", label, "[16]", "outside 0..15")


def test_unreadable_image_file(store, tmp_path):
    """an unreadable test image fails the run at the final evaluation, the reason naming the file"""
    samples = store.data_variant(seed=24)
    image = samples["test"][0][0]
    Path(image).write_bytes(b"\x89PNG truncated")
    grid = write_grid(tmp_path / "g.yaml", store.spec(data={"texdigits": {**store.base["data"]["texdigits"],
                                                                          "seed": 24}}), {"seed": [1]})
    reason = failed_at_run_time(store, tmp_path, grid)
    assert "cannot read image file" in reason and image in reason


# ----------------------------------------------------------------------------- other commands through the CLI


def _command_cases(root: Path, store: Store) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (study arguments, fragments the one error line must hold); all must exit 2."""
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(store.base))
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    data_file = write_grid(root / "data_file.yaml", store.spec(data={"root": str(a_file)}), {"seed": [1]})
    ckpt = write_grid(root / "ckpt.yaml", store.spec(tracking={"checkpoint_root": str(a_file / "ckpt")}),
                      {"seed": [1]})
    ckpt_spec = root / "ckpt_spec.yaml"
    ckpt_spec.write_text(yaml.safe_dump(store.spec(tracking={"checkpoint_root": str(a_file / "ckpt")})))
    fresh = write_grid(root / "fresh.yaml", store.spec(seed=77), {"seed": [77, 78]}, name="fresh")
    return {
        "texdigits data.root is a file": (["launch", str(data_file), "--executor", "debug"],
                                          [str(data_file), "data.root:", "is a file"]),
        "unwritable checkpoint_root (launch)": (["launch", str(ckpt), "--executor", "debug"],
                                                [str(ckpt), "tracking.checkpoint_root:", "not writable"]),
        "unwritable checkpoint_root (run)": (["run", str(ckpt_spec)],
                                             [str(ckpt_spec), "tracking.checkpoint_root:", "not writable"]),
        "report --out on a file": (["report", str(fresh), "--out", str(a_file)], ["--out", "is a file"]),
        "report before any run": (["report", str(fresh)], [str(fresh), "no finished run", "study launch"]),
        "--set without =": (["run", str(spec), "--set", "train.iterations"], ["--set", "KEY.PATH=VALUE"]),
        "--set with a bad YAML value": (["run", str(spec), "--set", "train.iterations=["], ["--set", "YAML value"]),
        "--set with a wrong type": (["run", str(spec), "--set", "train.iterations=ten"],
                                    ["--set train.iterations=ten", "train.iterations:", "integer"]),
        "--set on an empty key path": (["run", str(spec), "--set", "train..iterations=3"], ["--set", "dotted key"]),
        "cancel --only matching no run": (["cancel", str(fresh), "--only", "seed=5"], ["--only seed=5", "seed"]),
        "ui on a store that does not exist": (["ui", "--store", f"sqlite:///{root}/none.db"],
                                              ["--store", "does not exist"]),
    }


@pytest.fixture(scope="module")
def command_results(store, tmp_path_factory):
    """Each command case as a real `python -m study ...`, run side by side."""
    root = tmp_path_factory.mktemp("commands")
    cases = _command_cases(root, store)
    procs = {name: subprocess.Popen([sys.executable, "-m", "study", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=root, env=python_env())
             for name, (argv, _) in cases.items()}
    return {name: (cases[name][1], p.wait(300), *p.communicate()) for name, p in procs.items()}, root


COMMAND_CASES = ["texdigits data.root is a file", "unwritable checkpoint_root (launch)",
                 "unwritable checkpoint_root (run)", "report --out on a file", "report before any run",
                 "--set without =", "--set with a bad YAML value", "--set with a wrong type",
                 "--set on an empty key path", "cancel --only matching no run", "ui on a store that does not exist"]


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_cli_command_refuses_bad_input(command_results, case):
    """`study COMMAND` with bad input: exit 2, stderr is one `error:` line naming what is wrong, no traceback"""
    results, root = command_results
    fragments, rc, stdout, stderr = results[case]
    assert rc == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (root / "none.db").exists() and not (root / "a_file" ).is_dir()


def test_status_on_a_store_that_does_not_exist(store, tmp_path):
    """`study status` of a grid whose store does not exist: every run missing, exit 0, no store created"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(tracking={"uri": f"sqlite:///{tmp_path}/none.db"}),
                      {"seed": [1, 2]})
    out = subprocess.run([sys.executable, "-m", "study", "status", str(grid)], capture_output=True, text=True,
                         cwd=tmp_path, env=python_env(), timeout=300)
    assert out.returncode == 0 and "missing: 2" in out.stdout and not out.stderr.strip(), out
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "submitit").exists()


def test_debug_flag_shows_the_traceback(store, tmp_path):
    """`study --debug` turns the one-line error back into the traceback"""
    grid = write_grid(tmp_path / "g.yaml", store.spec(train={"iteratons": 5}), {"seed": [1]})
    out = subprocess.run([sys.executable, "-m", "study", "--debug", "launch", str(grid)], capture_output=True,
                         text=True, cwd=tmp_path, env=python_env(), timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr and "train.iteratons: unknown key" in out.stderr

"""texdigits: deterministic, cached, written in the SYNTHIA-SEQS layout and read back by the SYNTHIA reader."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from study.data import build_datasets
from study.data.texdigits import TexDigitsParams, ensure_texdigits

SMALL = TexDigitsParams(num_train=6, num_val=3, num_test=3, height=64, width=128, profile="synthia", seed=0)
SEQ = "SYNTHIA-SEQS-05-SUMMER"
STREAMS = [f"{side}/{cam}" for side in ("Stereo_Left", "Stereo_Right")
           for cam in ("Omni_B", "Omni_F", "Omni_L", "Omni_R")]
THINGS = (8, 9, 10, 11, 15)
RARE = (9, 10, 11, 15)  # traffic sign, pedestrian, bicycle, traffic light


def digest(tree: Path) -> dict[str, str]:
    """sha256 of every generated file (texdigits.json holds the build time, so it is left out)."""
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file() and p.name != "texdigits.json"}


def spec(root, params: TexDigitsParams, **kw) -> SimpleNamespace:
    base = dict(name="texdigits", root=str(root), splits=None, split_mode="paper", size=None, void="train",
                class_counts="train", mean=None, std=None, bgr=False, hflip=False, scale=None, crop=None,
                color_jitter=0.0, texdigits=SimpleNamespace(**params.__dict__))
    base.update(kw)
    return SimpleNamespace(**base)


def test_deterministic_from_seed(tmp_path):
    a = digest(ensure_texdigits(tmp_path / "a", SMALL))
    b = digest(ensure_texdigits(tmp_path / "b", SMALL))
    assert a == b and len(a) == 2 * 12 + 2  # RGB + label per image, splits.json, COMPLETE
    other = TexDigitsParams(**{**SMALL.__dict__, "seed": 1})
    c = digest(ensure_texdigits(tmp_path / "c", other))
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs)
    assert SMALL.key() != other.key()


def test_cached_not_regenerated(tmp_path):
    tree = ensure_texdigits(tmp_path, SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    time.sleep(0.01)
    assert ensure_texdigits(tmp_path, SMALL) == tree
    build_datasets(spec(tmp_path, SMALL), seed=3)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == stamps
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    # a different parameter is a different tree
    bigger = TexDigitsParams(**{**SMALL.__dict__, "num_test": 4})
    assert ensure_texdigits(tmp_path, bigger) != tree


def test_tree_is_synthia_layout_with_ids_in_red(tmp_path):
    tree = ensure_texdigits(tmp_path, SMALL)
    seq = tree / SEQ
    assert (tree / "COMPLETE").is_file() and (seq / "splits.json").is_file()
    manifest = json.loads((seq / "splits.json").read_text())
    assert [len(manifest[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    rels = sorted(str(p.relative_to(seq / "RGB")) for p in (seq / "RGB").rglob("*.png"))
    assert rels == sorted(manifest["train"] + manifest["val"] + manifest["test"])
    assert {"/".join(r.split("/")[:2]) for r in rels} == set(STREAMS)
    for rel in rels:
        assert (seq / "GT" / "LABELS" / rel).is_file()
        assert len(Path(rel).stem) == 6 and Path(rel).stem.isdigit()
        raw = cv2.imread(str(seq / "GT" / "LABELS" / rel), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (64, 128, 3)
        ids, inst = raw[..., 2], raw[..., 1]
        assert ids.max() <= 15 and not np.isin(ids, [13, 14]).any()
        assert (raw[..., 0] == 0).all()
        assert (inst[~np.isin(ids, THINGS)] == 0).all()  # instance ids only on things
        rgb = cv2.imread(str(seq / "RGB" / rel), cv2.IMREAD_UNCHANGED)
        assert rgb.dtype == np.uint8 and rgb.shape == (64, 128, 3)
    # read back through the SYNTHIA reader: targets are exactly the R channel
    b = build_datasets(spec(tmp_path, SMALL, void="train"), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 3, 3)
    assert b.num_classes == 16 and b.class_names[12] == "lanemarking"
    for ds in (b.train, b.val, b.test):
        for i in range(len(ds)):
            x, y = ds[i]
            raw = cv2.imread(ds.samples[i][1], cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(y.numpy(), raw[..., 2])
            assert x.shape == (3, 64, 128)
    # the run seed does not change a texdigits data set
    b2 = build_datasets(spec(tmp_path, SMALL), seed=99)
    assert b2.train.samples == b.train.samples and b2.fingerprint == b.fingerprint


def _build(args):
    root, params = args
    return str(ensure_texdigits(root, params))


def test_concurrent_builds_agree(tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        trees = pool.map(_build, [(str(tmp_path), SMALL)] * 2)
    assert trees[0] == trees[1]
    assert (Path(trees[0]) / "COMPLETE").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".stale"))] == []
    assert digest(Path(trees[0])) == digest(ensure_texdigits(tmp_path / "ref", SMALL))


@pytest.fixture(scope="module")
def default_synthia(tmp_path_factory):
    """The default data set (160/32/32, 128x256): 224 images, timed."""
    root = tmp_path_factory.mktemp("td")
    t0 = time.perf_counter()
    tree = ensure_texdigits(root, TexDigitsParams())
    seconds = time.perf_counter() - t0
    print(f"\ntexdigits 224 images 128x256 built in {seconds:.2f} s")
    return root, tree, seconds


def test_synthia_profile_frequencies(default_synthia):
    root, tree, seconds = default_synthia  # the build time is printed, never asserted (machine speed)
    counts = np.zeros(16, np.int64)
    seq = tree / SEQ
    for rel in json.loads((seq / "splits.json").read_text())["train"]:
        ids = cv2.imread(str(seq / "GT" / "LABELS" / rel), cv2.IMREAD_UNCHANGED)[..., 2]
        counts += np.bincount(ids.ravel(), minlength=16)
    pct = 100 * counts / counts.sum()
    table = json.loads((tree / "texdigits.json").read_text())["train_class_percent"]
    np.testing.assert_allclose([table[k] for k in table], pct, atol=1e-3)
    ref = {"building": 35, "road": 25, "sky": 11, "sidewalk": 7, "car": 5, "vegetation": 5, "fence": 4,
           "lanemarking": 4, "void": 2, "pole": 1}
    names = list(table)
    for name, target in ref.items():  # within a factor 1.6 of the paper's SYNTHIA frequencies
        assert target / 1.6 < pct[names.index(name)] < target * 1.6, (name, pct[names.index(name)])
    assert set(np.argsort(pct)[::-1][:2]) == {2, 3}  # building and road dominate
    for c in RARE:
        assert 0 < pct[c] < 0.6, (names[c], pct[c])
    assert pct[11] < 0.05  # bicycle rarest of the present classes
    assert counts[13] == counts[14] == 0
    b = build_datasets(spec(root, TexDigitsParams()), seed=0)
    np.testing.assert_array_equal(b.class_counts, counts)


def test_uniform_profile_is_balanced(tmp_path):
    p = TexDigitsParams(num_train=24, num_val=2, num_test=2, height=96, width=192, profile="uniform", seed=0)
    b = build_datasets(spec(tmp_path, p), seed=0)
    present = [c for c in range(16) if c not in (13, 14)]
    pct = 100 * b.class_counts / b.class_counts.sum()
    assert b.class_counts[13] == b.class_counts[14] == 0
    assert pct[present].min() > 100 / 14 / 2.5 and pct[present].max() < 100 / 14 * 2.0, pct


def test_bad_profile_named():
    with pytest.raises(ValueError, match="profile: 'zipf' is not allowed .allowed: synthia, uniform"):
        TexDigitsParams.from_spec({"profile": "zipf"})

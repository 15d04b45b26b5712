"""SYNTHIA-SEQS reader (SEQS-05 SUMMER layout) and its splits.

Layout: ``<root>/SYNTHIA-SEQS-05-SUMMER/{RGB,GT/LABELS}/{Stereo_Left,Stereo_Right}/{Omni_B,Omni_F,
Omni_L,Omni_R}/NNNNNN.png`` (``root`` may also be the sequence folder itself). Labels are 16-bit
3-channel PNGs read with ``cv2.IMREAD_UNCHANGED``; channel index 2 (R in OpenCV's BGR order) holds
the class id, channel 1 the instance id. 16 classes, ids 13 and 14 reserved (absent).

Splits (one "stream" = one side x camera folder):
- ``paper``: per stream, frames sorted by name and shuffled with ``random.Random(seed)``, first
  int(0.7 n) train, next int(0.1 n) val, the rest test. Streams visited camera-major (Omni_B
  Left/Right, Omni_F Left/Right, ...) as the released code does; its split seed was a fixed 0 and
  its file order the unsorted glob order. Neighbouring frames of one video land in different splits.
- ``by_stream``: leak-free at the stream level. Left and right stereo streams of one camera see the
  same scene at the same time, so the unit is the camera (both sides); cameras are shuffled with
  the seed and G cameras give max(1, round(0.1 G)) val, max(1, round(0.2 G)) test, the rest train.
- ``manifest``: ``splits.json`` in the sequence folder lists ``"<side>/<camera>/<frame>.png"`` per
  split (written by texdigits).
Void (id 0): ``void="train"`` keeps it as class 0 (the study trained and scored it);
``void="ignore"`` maps it to the ignore index 255.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from study.data.base import check_label_range

SEQUENCE = "SYNTHIA-SEQS-05-SUMMER"
SIDES = ("Stereo_Left", "Stereo_Right")
CAMERAS = ("Omni_B", "Omni_F", "Omni_L", "Omni_R")
MANIFEST = "splits.json"
SPLIT_MODES = ("paper", "by_stream", "manifest")
VOID_MODES = ("train", "ignore")
SPLITS = ("train", "val", "test")
SYNTHIA_CLASSES = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
    "traffic_sign", "pedestrian", "bicycle", "lanemarking", "reserved_13", "reserved_14",
    "traffic_light",
)
NUM_CLASSES = len(SYNTHIA_CLASSES)
# The study's normalisation (released code), on 0..255 values in OpenCV's BGR order.
SYNTHIA_MEAN_BGR = (55.09944, 62.203827, 71.23802)
SYNTHIA_STD_BGR = (49.56111, 51.497387, 55.363934)


@dataclass(frozen=True)
class SynthiaLabel:
    """Decoder: label PNG -> uint8 [H, W] class ids (void per ``void``), checked against the class range."""

    void: str = "train"
    ignore_index: int = 255

    def __call__(self, path: str) -> np.ndarray:
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise FileNotFoundError(f"cannot read SYNTHIA label file {path!r}")
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise ValueError(f"SYNTHIA label file {path!r} has shape {raw.shape}; expected a 3-channel "
                             "16-bit PNG with the class id in the R channel")
        ids = raw[..., 2]
        check_label_range(ids, NUM_CLASSES, self.ignore_index, path)
        label = ids.astype(np.uint8)
        if self.void == "ignore":
            label[label == 0] = self.ignore_index
        return label


def find_sequence_dir(root: str | Path) -> Path:
    """The folder holding RGB/ and GT/LABELS/: ``root/SYNTHIA-SEQS-05-SUMMER`` or ``root`` itself."""
    root = Path(root)
    for cand in (root / SEQUENCE, root):
        if (cand / "RGB").is_dir() and (cand / "GT" / "LABELS").is_dir():
            return cand
    state = "does not exist" if not root.exists() else "is incomplete"
    raise FileNotFoundError(
        f"SYNTHIA data root {str(root)!r} {state}: expected {SEQUENCE}/RGB/<side>/<camera>/NNNNNN.png and "
        f"{SEQUENCE}/GT/LABELS/<side>/<camera>/NNNNNN.png inside it (side in {SIDES}, camera in {CAMERAS})")


def list_streams(seq_dir: Path) -> dict[str, list[str]]:
    """Stream key "<side>/<camera>" -> sorted frame file names, camera-major order; labels must exist."""
    streams: dict[str, list[str]] = {}
    for cam in CAMERAS:
        for side in SIDES:
            rgb_dir = seq_dir / "RGB" / side / cam
            if not rgb_dir.is_dir():
                continue
            frames = sorted(p.name for p in rgb_dir.glob("*.png"))
            for f in frames:
                lbl = seq_dir / "GT" / "LABELS" / side / cam / f
                if not lbl.is_file():
                    raise FileNotFoundError(f"SYNTHIA image {str(rgb_dir / f)!r} has no label file {str(lbl)!r}")
            if frames:
                streams[f"{side}/{cam}"] = frames
    if not streams:
        raise FileNotFoundError(
            f"no frames under {str(seq_dir / 'RGB')!r}: expected <side>/<camera>/NNNNNN.png "
            f"(side in {SIDES}, camera in {CAMERAS})")
    return streams


def split_paper(streams: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    """Per stream shuffle (random.Random(seed)) then 70/10/20 by int() truncation; entries "<stream>/<frame>"."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, frames in streams.items():
        order = list(frames)
        random.Random(seed).shuffle(order)
        n = len(order)
        n_train, n_val = int(0.7 * n), int(0.1 * n)
        out["train"] += [f"{key}/{f}" for f in order[:n_train]]
        out["val"] += [f"{key}/{f}" for f in order[n_train:n_train + n_val]]
        out["test"] += [f"{key}/{f}" for f in order[n_train + n_val:]]
    return out


def split_by_stream(streams: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    """Whole cameras (both stereo sides) per split: val max(1, round(0.1 G)), test max(1, round(0.2 G))."""
    cams = [c for c in CAMERAS if any(k.endswith("/" + c) for k in streams)]
    random.Random(seed).shuffle(cams)
    g = len(cams)
    n_val, n_test = max(1, round(0.1 * g)), max(1, round(0.2 * g))
    if g - n_val - n_test < 1:
        raise ValueError(f"split_mode 'by_stream' needs at least 3 cameras with frames; found {sorted(cams)}")
    groups = {"val": cams[:n_val], "test": cams[n_val:n_val + n_test], "train": cams[n_val + n_test:]}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split, members in groups.items():
        for key, frames in streams.items():  # keep camera-major stream order
            if key.split("/")[1] in members:
                out[split] += [f"{key}/{f}" for f in frames]
    return out


def split_manifest(seq_dir: Path, streams: dict[str, list[str]]) -> dict[str, list[str]]:
    """Splits listed in ``seq_dir/splits.json``; every entry must be an existing frame."""
    path = seq_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"split_mode 'manifest' needs {str(path)!r} (keys {SPLITS}, values lists of "
                                "'<side>/<camera>/<frame>.png')")
    manifest = json.loads(path.read_text())
    known = {f"{k}/{f}" for k, frames in streams.items() for f in frames}
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        entries = manifest.get(split, [])
        missing = [e for e in entries if e not in known]
        if missing:
            raise FileNotFoundError(f"{str(path)!r} lists frames that do not exist: {missing[:5]}")
        out[split] = list(entries)
    return out


def synthia_samples(root: str | Path, split_mode: str, seed: int
                    ) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """(sequence folder, {split: [(rgb path, label path), ...]}) for ``split_mode`` in SPLIT_MODES."""
    if split_mode not in SPLIT_MODES:
        raise ValueError(f"data.split_mode {split_mode!r} is not one of {SPLIT_MODES}")
    seq_dir = find_sequence_dir(root)
    streams = list_streams(seq_dir)
    if split_mode == "paper":
        names = split_paper(streams, seed)
    elif split_mode == "by_stream":
        names = split_by_stream(streams, seed)
    else:
        names = split_manifest(seq_dir, streams)
    return seq_dir, {
        split: [(str(seq_dir / "RGB" / e), str(seq_dir / "GT" / "LABELS" / e)) for e in entries]
        for split, entries in names.items()
    }

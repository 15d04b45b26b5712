"""texdigits: an offline street-scene-like data set with exact labels, written in the SYNTHIA-SEQS layout.

Stuff classes are regions filled with real texture photos shipped inside scikit-image (random crop,
zoom, flip, colour tint and brightness per image); thing classes are real handwritten digits from
scikit-learn's ``load_digits`` (1,797 8x8 images), upscaled, thresholded and filled with their own
texture, so shape and texture both carry the class. 16 SYNTHIA class ids; 13 and 14 stay absent.

Profiles:
- ``synthia``: a street layout (sky, skyline of buildings, sidewalk band, road with lane markings,
  fences, trees, poles carrying signs and lights, cars on the road, pedestrians on the sidewalk)
  tuned so pixel frequencies follow the SYNTHIA figures in the paper (building ~35 %, road ~25 %,
  ..., pedestrian ~0.3 %, traffic light ~0.1 %). Bicycle is floored at ~0.01 % (paper: 0.002 %) so a
  training split of ~160 images still holds a few bicycles.
- ``uniform``: a Voronoi partition whose cells cycle through the 9 stuff classes, plus digits for the
  5 thing classes sized to give every present class roughly the same share (~1/14).

Thing digits: car 0, pedestrian 1, traffic sign 4, traffic light 7, bicycle 8; train/val/test images
draw their digits from disjoint thirds (70/10/20 per digit) of ``load_digits``.

Output: ``<root>/<key>/SYNTHIA-SEQS-05-SUMMER/{RGB,GT/LABELS}/{side}/{camera}/NNNNNN.png`` (image k goes
to stream k mod 8 in camera-major order, frame k div 8), ``splits.json`` (the split manifest),
``<root>/<key>/texdigits.json`` (parameters, build time, class pixel counts) and the marker
``COMPLETE``. ``key`` names the profile, size, counts and seed plus a hash of all generation
parameters. The tree is generated in a temporary folder and renamed into place, so concurrent jobs
never see a partial tree; an existing complete tree is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from study.data.stats import fingerprint
from study.data.synthia import CAMERAS, MANIFEST, SEQUENCE, SIDES, SPLITS, SYNTHIA_CLASSES

GENERATOR_VERSION = 1
PROFILES = ("synthia", "uniform")
COMPLETE = "COMPLETE"
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]
STREAMS = tuple(f"{side}/{cam}" for cam in CAMERAS for side in SIDES)  # camera-major, as the loader lists

VOID, SKY, BUILDING, ROAD, SIDEWALK, FENCE, VEGETATION, POLE, CAR, SIGN, PEDESTRIAN, BICYCLE, \
    LANEMARKING, _R13, _R14, LIGHT = range(16)
STUFF = (VOID, SKY, BUILDING, ROAD, SIDEWALK, FENCE, VEGETATION, POLE, LANEMARKING)
THING_DIGIT = {CAR: 0, PEDESTRIAN: 1, SIGN: 4, LIGHT: 7, BICYCLE: 8}
THING_ASPECT = {CAR: 1.6, PEDESTRIAN: 0.5, SIGN: 1.0, LIGHT: 0.6, BICYCLE: 1.2}  # width / height

# class -> (skimage.data image, RGB tint for grey sources or None for colour photos)
TEXTURES: dict[int, tuple[str, tuple[int, int, int] | None]] = {
    VOID: ("text", (150, 95, 160)),
    SKY: ("moon", (150, 190, 240)),
    BUILDING: ("brick", (190, 115, 85)),
    ROAD: ("gravel", (115, 115, 120)),
    SIDEWALK: ("cell", (205, 185, 150)),
    FENCE: ("checkerboard", (150, 125, 95)),
    VEGETATION: ("grass", (75, 160, 65)),
    POLE: ("camera", (205, 200, 95)),
    CAR: ("coffee", None),
    SIGN: ("coins", (235, 200, 45)),
    PEDESTRIAN: ("astronaut", None),
    BICYCLE: ("chelsea", None),
    LANEMARKING: ("page", (245, 245, 240)),
    LIGHT: ("hubble_deep_field", None),
}


@dataclass(frozen=True)
class TexDigitsParams:
    """Generation parameters; every field enters the cache key."""

    num_train: int = 160
    num_val: int = 32
    num_test: int = 32
    height: int = 128
    width: int = 256
    profile: Literal["synthia", "uniform"] = "synthia"
    seed: int = 0

    @staticmethod
    def check(settings: dict) -> None:
        """Refuse what the generator cannot draw (SettingError naming the field)."""
        from study.components import SettingError

        for k in ("num_train", "num_val", "num_test"):
            if settings[k] < 1:
                raise SettingError(k, f"{settings[k]} is out of range", "an integer >= 1")
        for k in ("height", "width"):
            if not 32 <= settings[k] <= 8192:
                raise SettingError(k, f"{settings[k]} is out of range", "an integer in [32, 8192]")

    @classmethod
    def from_spec(cls, obj) -> "TexDigitsParams":
        """From a mapping of (some of) these fields, checked; missing ones take the defaults."""
        from study.components import Component, SettingError

        if obj is not None and not isinstance(obj, dict):  # a record read by attribute
            obj = {k: getattr(obj, k) for k in cls.__dataclass_fields__ if hasattr(obj, k)}
        try:
            return cls(**Component("texdigits", cls, check=cls.check).resolve(obj or {}))
        except SettingError as err:
            raise ValueError(f"data.texdigits.{err}") from None

    def counts(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}

    def key(self) -> str:
        h = fingerprint({**asdict(self), "version": GENERATOR_VERSION})[:10]
        n = self.num_train + self.num_val + self.num_test
        return f"{self.profile}-{self.height}x{self.width}-n{n}-s{self.seed}-{h}"


# ----------------------------------------------------------------------------------- material
@lru_cache(maxsize=1)
def _textures() -> dict[int, np.ndarray]:
    """class -> float32 texture in 0..1: grey sources contrast-normalised (H, W), colour (H, W, 3) RGB."""
    import skimage.data

    out = {}
    for cls, (name, tint) in TEXTURES.items():
        img = np.asarray(getattr(skimage.data, name)())
        if tint is None:
            out[cls] = img[..., :3].astype(np.float32) / 255.0
        else:
            g = img.astype(np.float32)
            if g.ndim == 3:
                g = g[..., :3].mean(-1)
            out[cls] = np.clip((g - g.mean()) / (g.std() + 1e-6) * 0.2 + 0.5, 0.0, 1.0)
    return out


@lru_cache(maxsize=1)
def _digit_pools() -> dict[str, dict[int, np.ndarray]]:
    """split -> digit -> (n, 8, 8) float32 in 0..1; per digit the first 70 % / next 10 % / rest."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for digit in set(THING_DIGIT.values()):
        imgs = d.images[d.target == digit].astype(np.float32) / 16.0
        a, b = int(0.7 * len(imgs)), int(0.8 * len(imgs))
        pools["train"][digit], pools["val"][digit], pools["test"][digit] = imgs[:a], imgs[a:b], imgs[b:]
    return pools


def _texture_canvas(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """An h x w x 3 float32 RGB (0..255) patch of the class texture: random zoom, crop, flip, tint, brightness."""
    src = _textures()[cls]
    zoom = rng.uniform(0.6, 1.5)
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    ph, pw = max(0, ch - src.shape[0]), max(0, cw - src.shape[1])
    if ph or pw:
        src = np.pad(src, ((0, ph), (0, pw)) + ((0, 0),) * (src.ndim - 2), mode="symmetric")
    y = int(rng.integers(0, src.shape[0] - ch + 1))
    x = int(rng.integers(0, src.shape[1] - cw + 1))
    patch = src[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = cv2.resize(np.ascontiguousarray(patch), (w, h), interpolation=cv2.INTER_LINEAR)
    tint = TEXTURES[cls][1]
    if tint is None:
        rgb = patch * 255.0 * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    else:
        colour = np.asarray(tint, np.float32) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
        rgb = colour * (0.35 + 0.65 * patch)[..., None]
    return rgb * np.float32(rng.uniform(0.75, 1.2))


def _digit_mask(rng: np.random.Generator, pool: dict[int, np.ndarray], digit: int, h: int, w: int) -> np.ndarray:
    """A random handwritten ``digit`` from ``pool`` upscaled (bicubic) to h x w and thresholded at 0.4."""
    imgs = pool[digit]
    img = imgs[int(rng.integers(0, len(imgs)))]
    return cv2.resize(img, (max(2, w), max(2, h)), interpolation=cv2.INTER_CUBIC) > 0.4


def _paste(label: np.ndarray, inst: np.ndarray, mask: np.ndarray, y: int, x: int, cls: int, inst_id: int) -> None:
    """Write ``cls``/``inst_id`` where ``mask`` (top-left at y, x) is set, clipped to the image."""
    H, W = label.shape
    h, w = mask.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y1 <= y0 or x1 <= x0:
        return
    m = mask[y0 - y:y1 - y, x0 - x:x1 - x]
    label[y0:y1, x0:x1][m] = cls
    inst[y0:y1, x0:x1][m] = inst_id


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Polygon (int32 [n, 2]) of a wobbly ellipse."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    wob = 1 + sum(rng.uniform(-0.12, 0.12) * np.sin(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.stack([cx + rx * wob * np.cos(t), cy + ry * wob * np.sin(t)], 1).round().astype(np.int32)


# ------------------------------------------------------------------------------------ layouts
class _Things:
    """Pastes digit-shaped things and numbers their instances."""

    def __init__(self, rng: np.random.Generator, pool: dict[int, np.ndarray], label: np.ndarray,
                 inst: np.ndarray) -> None:
        self.rng, self.pool, self.label, self.inst, self.next_id = rng, pool, label, inst, 1

    def add(self, cls: int, h: float, bottom: float, cx: float) -> None:
        h_i = max(4, int(round(h)))
        w_i = max(3, int(round(h * THING_ASPECT[cls] * self.rng.uniform(0.9, 1.1))))
        mask = _digit_mask(self.rng, self.pool, THING_DIGIT[cls], h_i, w_i)
        _paste(self.label, self.inst, mask, int(round(bottom)) - h_i, int(round(cx - w_i / 2)), cls, self.next_id)
        self.next_id += 1


def _layout_street(rng: np.random.Generator, pool: dict[int, np.ndarray], H: int, W: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Street scene: sky, skyline, fence, trees, sidewalk, road + lane markings, poles, signs, lights, things."""
    label = np.full((H, W), SKY, np.uint8)
    inst = np.zeros((H, W), np.uint16)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yl, yr = H * rng.uniform(0.6, 0.7), H * rng.uniform(0.6, 0.7)

    def road_y(x):
        return yl + (yr - yl) * np.asarray(x, np.float32) / (W - 1)

    sw_h = H * rng.uniform(0.05, 0.1)
    x = 0
    while x < W:  # skyline
        bw = int(W * rng.uniform(0.08, 0.25)) + 1
        if rng.random() < 0.93:
            label[int(H * rng.uniform(0.0, 0.2)):, x:x + bw] = BUILDING
        x += bw
    for _ in range(int(rng.integers(1, 5))):  # trees, rooted behind the sidewalk
        cx = rng.uniform(0, W)
        r = H * rng.uniform(0.09, 0.16)
        cy = float(road_y(cx)) - sw_h - r * rng.uniform(0.4, 1.0)
        cv2.fillPoly(label, [_blob(rng, cx, cy, r * rng.uniform(0.9, 1.6), r)], VEGETATION)
    if rng.random() < 0.9:  # fence segment standing on the sidewalk's far edge
        x0 = rng.uniform(-0.1, 0.6) * W
        x1 = x0 + W * rng.uniform(0.3, 0.7)
        fh = H * rng.uniform(0.07, 0.13)
        base = road_y([x0, x1]) - sw_h
        cv2.fillPoly(label, [np.array([[x0, base[0]], [x1, base[1]], [x1, base[1] - fh], [x0, base[0] - fh]],
                                      np.float32).round().astype(np.int32)], FENCE)
    label[yy >= road_y(xx) - sw_h] = SIDEWALK
    road = yy >= road_y(xx)
    label[road] = ROAD
    # lane markings: two edge lines and a dashed centre line converging to a vanishing point
    vpx, vpy = W * rng.uniform(0.35, 0.65), min(yl, yr) - H * rng.uniform(0.02, 0.08)
    depth = np.clip((yy - vpy) / (H - vpy), 1e-3, None)
    wb = W * rng.uniform(0.05, 0.08)
    lanes = np.zeros((H, W), bool)
    for xb, dashed in ((W * rng.uniform(0.4, 0.6), True), (W * rng.uniform(-0.1, 0.1), False),
                       (W * rng.uniform(0.9, 1.1), False)):
        on = np.abs(xx - (vpx + (xb - vpx) * depth)) < wb / 2 * depth
        if dashed:
            on &= np.mod(np.log(depth) * 3.0 + rng.uniform(0, 1), 1.0) < 0.55
        lanes |= on
    if rng.random() < 0.35:  # zebra crossing
        y0 = rng.uniform(float(max(yl, yr)) + 2, H - 0.08 * H)
        band = (yy >= y0) & (yy < y0 + H * rng.uniform(0.05, 0.09))
        lanes |= band & (np.mod(xx + rng.uniform(0, 16), 16) < 8)
    label[lanes & road] = LANEMARKING
    for _ in range(int(rng.integers(2, 6))):  # void: clutter
        cv2.fillPoly(label, [_blob(rng, rng.uniform(0, W), rng.uniform(0.1 * H, H),
                                   H * rng.uniform(0.03, 0.08), H * rng.uniform(0.03, 0.08))], VOID)
    things = _Things(rng, pool, label, inst)
    for _ in range(int(rng.integers(0, 4))):  # poles on the sidewalk, some carrying a sign or a light
        px = rng.uniform(0, W)
        base = float(road_y(px)) - sw_h * rng.uniform(0.1, 0.7)
        ph = H * rng.uniform(0.28, 0.5)
        pw = max(2, int(round(W * rng.uniform(0.012, 0.02))))
        top = int(round(base - ph))
        label[max(top, 0):int(round(base)), int(px):int(px) + pw] = POLE
        if rng.random() < 0.6:
            things.add(SIGN, H * rng.uniform(0.09, 0.13), top + 2, px + pw / 2)
        else:
            things.add(LIGHT, H * rng.uniform(0.1, 0.14), top + 2, px + pw / 2)
    for _ in range(int(rng.integers(1, 6))):  # cars on the road
        cx = rng.uniform(0, W)
        things.add(CAR, H * rng.uniform(0.17, 0.32), rng.uniform(float(road_y(cx)) + 0.1 * H, H + 0.05 * H), cx)
    for _ in range(int(rng.poisson(1.3))):  # pedestrians on the sidewalk
        cx = rng.uniform(0, W)
        things.add(PEDESTRIAN, H * rng.uniform(0.13, 0.2), float(road_y(cx)) - sw_h * rng.uniform(0.0, 0.5), cx)
    if rng.random() < 0.025:  # rare bicycle at the kerb
        cx = rng.uniform(0, W)
        things.add(BICYCLE, H * rng.uniform(0.1, 0.14), float(road_y(cx)) + 0.02 * H, cx)
    return label, inst


def _layout_uniform(rng: np.random.Generator, pool: dict[int, np.ndarray], H: int, W: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells cycling through the 9 stuff classes (2 cells each) + ~equal-area digits per thing class."""
    n = 2 * len(STUFF)
    sites = rng.uniform(0, 1, (n, 2)) * np.array([H, W])
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    d = (yy[None] - sites[:, 0, None, None]) ** 2 + (xx[None] - sites[:, 1, None, None]) ** 2
    classes = np.array(STUFF * 2, np.uint8)[rng.permutation(n)]
    label = classes[np.argmin(d, 0)]
    inst = np.zeros((H, W), np.uint16)
    things = _Things(rng, pool, label, inst)
    order = [c for c in THING_DIGIT for _ in range(3)]
    for cls in [order[i] for i in rng.permutation(len(order))]:
        h = H * rng.uniform(0.34, 0.46) / np.sqrt(THING_ASPECT[cls])
        things.add(cls, h, rng.uniform(h, H + 0.2 * h), rng.uniform(0, W))
    return label, inst


def render_sample(params: TexDigitsParams, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], class ids uint8 [H, W], instance ids uint16 [H, W]) of image ``index`` of ``split``.

    Seeded by (seed, split, index) alone, so changing one split's count leaves the other images as they are.
    """
    rng = np.random.default_rng([params.seed, SPLITS.index(split), index])
    H, W = params.height, params.width
    layout = _layout_street if params.profile == "synthia" else _layout_uniform
    label, inst = layout(rng, _digit_pools()[split], H, W)
    rgb = np.zeros((H, W, 3), np.float32)
    for cls in np.unique(label):
        m = label == cls
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # texture only the bounding box
        sub = m[y0:y1, x0:x1]
        rgb[y0:y1, x0:x1][sub] = _texture_canvas(rng, int(cls), y1 - y0, x1 - x0)[sub]
    ang = rng.uniform(0, 2 * np.pi)  # smooth illumination gradient + sensor noise + slight blur
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb *= (1 + 0.15 * (np.cos(ang) * (xx / W - 0.5) + np.sin(ang) * (yy / H - 0.5)) * 2)[..., None]
    rgb += rng.normal(0, 3.0, rgb.shape).astype(np.float32)
    rgb = cv2.GaussianBlur(rgb, (3, 3), 0.6)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), label, inst


# ------------------------------------------------------------------------------------- writing
def generate_tree(out: Path, params: TexDigitsParams) -> dict:
    """Write all images in the SYNTHIA-SEQS layout under ``out``; returns the info written to texdigits.json."""
    t0 = time.perf_counter()
    seq = out / SEQUENCE
    for stream in STREAMS:
        (seq / "RGB" / stream).mkdir(parents=True, exist_ok=True)
        (seq / "GT" / "LABELS" / stream).mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = np.zeros(len(SYNTHIA_CLASSES), np.int64)
    k = 0
    for split, n in params.counts().items():
        for i in range(n):
            rgb, label, inst = render_sample(params, split, i)
            rel = f"{STREAMS[k % len(STREAMS)]}/{k // len(STREAMS):06d}.png"
            gt = np.zeros(label.shape + (3,), np.uint16)
            gt[..., 2] = label  # OpenCV order: channel 2 is R = class id
            gt[..., 1] = inst  # G = instance id
            if not (cv2.imwrite(str(seq / "RGB" / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), PNG_FAST)
                    and cv2.imwrite(str(seq / "GT" / "LABELS" / rel), gt, PNG_FAST)):
                raise OSError(f"cannot write texdigits frame {rel!r} under {str(seq)!r}")
            manifest[split].append(rel)
            if split == "train":
                counts += np.bincount(label.ravel(), minlength=len(counts))[:len(counts)]
            k += 1
    (seq / MANIFEST).write_text(json.dumps(manifest, indent=1))
    total = max(int(counts.sum()), 1)
    info = {"params": asdict(params), "generator_version": GENERATOR_VERSION,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "train_class_pixels": {n: int(c) for n, c in zip(SYNTHIA_CLASSES, counts)},
            "train_class_percent": {n: round(100 * int(c) / total, 4) for n, c in zip(SYNTHIA_CLASSES, counts)}}
    (out / "texdigits.json").write_text(json.dumps(info, indent=1))
    return info


def ensure_texdigits(root: str | Path, params: TexDigitsParams) -> Path:
    """The complete tree ``root/<key>`` for ``params``, generating it first if absent (atomic rename)."""
    root = Path(root)
    tree = root / params.key()
    if (tree / COMPLETE).is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{params.key()}-", dir=root))
    try:
        generate_tree(tmp, params)
        (tmp / COMPLETE).write_text(params.key() + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is meant to be shared
        try:
            os.rename(tmp, tree)
        except OSError:
            if not (tree / COMPLETE).is_file():  # a stale partial tree: move it away, then retry
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{params.key()}-", dir=root))
                os.rename(tree, stale / "tree")
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, tree)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race to another job, or failed
    return tree

"""Device check: ``python -m benchmarks.device [--smoke] [--out PATH]`` (``make device-check``).

Prints one table and writes it, with the machine, to ``benchmarks/device.md`` (or ``--out``).
The full mode needs CUDA (without it: one line on stderr, exit status 2, nothing written) and is
sized to finish within ~5 minutes on one GPU. ``--smoke`` runs every section at tiny sizes on the
CPU (a rot check for the test suite, not a measurement of anything the study cares about).

Sections:

1. step: one training step (forward, CE, backward, Adam) of the paper's DeepLabV3+ on
   ``paper_resnet18`` (16 classes, output stride 16) at 384x768, batch 6, in it/s, for fp32 with
   torch's defaults, fp32 + TF32, bf16 autocast, bf16 + channels_last, and + ``torch.compile``
   (cudnn.benchmark on from the TF32 row on; fused Adam on CUDA);
2. loss: recall loss vs CE forward + backward on logits (8, 19, 512, 1024), ratio (goal <= 1.05x);
3. confusion: ``ConfusionMatrix.update`` vs torchmetrics ``MulticlassConfusionMatrix`` on the device;
4. data: images/s of the SYNTHIA reader on texdigits written at 384x768 (16-bit label PNGs) with a
   DataLoader of 2/4/8 workers, against the images/s the bf16 + channels_last step consumes;
5. packed: k = 1, 2, 4 processes training the bf16 + channels_last step on the one device at the
   same time: aggregate it/s and peak memory per run;
6. resume: a small model trained N steps straight vs N/2 steps, checkpoint, fresh process state,
   N/2 more: difference of the final mIoU and of the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import io
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "device.md"
NUM_CLASSES = 16


@dataclass(frozen=True)
class StepSetup:
    """One training-step configuration (picklable, for the packed workers)."""

    height: int
    width: int
    batch: int
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    seed: int = 0


@dataclass(frozen=True)
class Sizes:
    step: StepSetup
    step_warmup: int
    step_iters: int
    loss_shape: tuple[int, int, int, int]
    loss_rounds: int
    conf_maps: int
    conf_hw: tuple[int, int]
    data_hw: tuple[int, int]
    data_images: int
    data_batches: int
    workers: tuple[int, ...]
    pack_ks: tuple[int, ...]
    pack_warmup: int
    pack_iters: int
    resume_steps: int
    resume_hw: tuple[int, int]
    threads: int = 0  # torch threads of the main process (0: leave torch's default)
    compile_backend: str = "inductor"
    notes: list[str] = field(default_factory=list)


FULL = Sizes(step=StepSetup(384, 768, 6), step_warmup=5, step_iters=30, loss_shape=(8, 19, 512, 1024),
             loss_rounds=5, conf_maps=40, conf_hw=(512, 1024), data_hw=(384, 768), data_images=24,
             data_batches=20, workers=(2, 4, 8), pack_ks=(1, 2, 4), pack_warmup=5, pack_iters=25,
             resume_steps=60, resume_hw=(64, 128))
SMOKE = Sizes(step=StepSetup(32, 64, 2), step_warmup=1, step_iters=2, loss_shape=(2, 19, 32, 64), loss_rounds=2,
              conf_maps=4, conf_hw=(64, 128), data_hw=(64, 128), data_images=4, data_batches=3, workers=(0, 2),
              pack_ks=(1, 2), pack_warmup=1, pack_iters=2, resume_steps=6, resume_hw=(32, 64), threads=1,
              compile_backend="eager")


@dataclass
class Row:
    """One line of the device table."""

    section: str
    what: str
    value: str
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ----------------------------------------------------------------------------------- 1. the step
def build_paper_model() -> torch.nn.Module:
    """The paper's DeepLabV3+ (``paper_resnet18``, 16 classes, OS 16), with the released decoder
    (``decoder="official"``) when this version of ``build_model`` offers it."""
    from study.models import build_model

    kwargs = {"decoder": "official"} if "decoder" in inspect.signature(build_model).parameters else {}
    return build_model("deeplabv3plus", "paper_resnet18", NUM_CLASSES, 16, None, **kwargs)


def make_step(setup: StepSetup, device: torch.device):
    """A closure running one training step on fixed random data; the model set up by ``study.accel``."""
    from study.accel import input_memory_format, optimizer_kwargs, prepare_model

    torch.manual_seed(setup.seed)
    model = prepare_model(build_paper_model().to(device), channels_last=setup.channels_last,
                          compile=setup.compile, compile_backend=setup.compile_backend)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **optimizer_kwargs("adam", device, fused=True))
    g = torch.Generator().manual_seed(setup.seed)
    images = torch.randn(setup.batch, 3, setup.height, setup.width, generator=g)
    images = images.to(device).contiguous(memory_format=input_memory_format(setup.channels_last))
    targets = torch.randint(0, NUM_CLASSES, (setup.batch, setup.height, setup.width), generator=g).to(device)

    def step() -> None:
        with _autocast(device, setup.bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _time_steps(step, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(it/s over ``iters`` steps, seconds of the ``warmup`` steps, compilation included)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters / (time.perf_counter() - t1), t1 - t0


def section_step(sizes: Sizes, device: torch.device) -> tuple[list[Row], float]:
    """Rows of section 1 and the images/s of the bf16 + channels_last step (for section 4)."""
    from study.accel import configure_backends

    base = replace(sizes.step, compile_backend=sizes.compile_backend)
    variants = [("fp32 (torch defaults)", base, None),
                ("fp32 + TF32", base, True),
                ("bf16 autocast", replace(base, bf16=True), True),
                ("bf16 + channels_last", replace(base, bf16=True, channels_last=True), True),
                ("bf16 + channels_last + compile", replace(base, bf16=True, channels_last=True, compile=True), True)]
    rows, consume = [], float("nan")
    s = sizes.step
    for name, setup, tuned in variants:
        if tuned:
            configure_backends(device, tf32=True, cudnn_benchmark=True)
        it_s, warm = _time_steps(make_step(setup, device), device, sizes.step_warmup, sizes.step_iters)
        note = f"{sizes.step_iters} steps after {sizes.step_warmup} warm-up ({warm:.1f} s)"
        if setup.compile:
            note += f"; compile backend {setup.compile_backend}"
        rows.append(Row("step", f"{name}: {s.height}x{s.width}, batch {s.batch}", f"{it_s:.2f} it/s", note))
        if name == "bf16 + channels_last":
            consume = it_s * s.batch
    return rows, consume


# ----------------------------------------------------------------------------------- 2. loss
def section_loss(sizes: Sizes, device: torch.device) -> list[Row]:
    from study.losses import build_loss

    n, c, h, w = sizes.loss_shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(sizes.loss_shape, generator=g) * 2).to(device).requires_grad_(True)
    target = torch.randint(0, c - 2, (n, h, w), generator=g)
    target[torch.rand((n, h, w), generator=g) < 0.1] = 255
    target = target.to(device)
    losses = {"recall": build_loss("recall", c).to(device), "ce": build_loss("ce", c).to(device)}

    def run(name: str) -> float:
        _sync(device)
        t = time.perf_counter()
        logits.grad = None
        losses[name](logits, target).backward()
        _sync(device)
        return time.perf_counter() - t

    run("recall"), run("ce")  # warm-up
    ratios, times = [], {"recall": [], "ce": []}
    for r in range(sizes.loss_rounds):
        order = ("recall", "ce") if r % 2 == 0 else ("ce", "recall")
        got = {name: run(name) for name in order}
        for name in got:
            times[name].append(got[name])
        ratios.append(got["recall"] / got["ce"])
    ratio = statistics.median(ratios)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return [Row("loss", f"recall / CE fwd+bwd on {tuple(sizes.loss_shape)}", f"{ratio:.3f}x",
                f"recall {ms['recall']:.1f} ms, CE {ms['ce']:.1f} ms, median of {sizes.loss_rounds} interleaved "
                f"rounds; goal <= 1.05x: {'met' if ratio <= 1.05 else 'NOT met'}")]


# ----------------------------------------------------------------------------------- 3. confusion
def section_confusion(sizes: Sizes, device: torch.device) -> list[Row]:
    from torchmetrics.classification import MulticlassConfusionMatrix

    from study.metrics import ConfusionMatrix

    c, (h, w), n = 19, sizes.conf_hw, sizes.conf_maps
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand((n, h, w), generator=g) < 0.1] = 255
    pred = torch.where(torch.rand((n, h, w), generator=g) < 0.7, target.clamp(max=c - 1),
                       torch.randint(0, c, (n, h, w), generator=g))
    pred, target = pred.to(device), target.to(device)
    batches = [(i, min(i + 5, n)) for i in range(0, n, 5)]
    out = {}

    def ours() -> None:
        cm = ConfusionMatrix(c, ignore_index=255, device=device)
        for a, b in batches:
            cm.update(pred[a:b], target[a:b])
        out["ours"] = cm.mat

    def tm() -> None:
        m = MulticlassConfusionMatrix(c, ignore_index=255, validate_args=False).to(device)
        for a, b in batches:
            m.update(pred[a:b], target[a:b])
        out["tm"] = m.confmat

    times: dict[str, list[float]] = {"ours": [], "tm": []}
    for r in range(4):  # round 0 is the warm-up
        for name, fn in ((("ours", ours), ("tm", tm)) if r % 2 == 0 else (("tm", tm), ("ours", ours))):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - t)
    if not torch.equal(out["ours"].cpu(), out["tm"].cpu().long()):
        raise AssertionError("confusion matrices of ours and torchmetrics differ")
    px = n * h * w
    o, t = (statistics.median(times[k]) for k in ("ours", "tm"))
    return [Row("confusion", f"update, {n} maps {h}x{w}, 19 classes, batches of 5, on {device.type}",
                f"{o / px * 1e9:.3f} ns/px", f"torchmetrics {t / px * 1e9:.3f} ns/px: ours {t / o:.2f}x faster; "
                "matrices equal")]


# ----------------------------------------------------------------------------------- 4. data
def _texdigits_dataset(root: Path, sizes: Sizes):
    """The SYNTHIA reader (``synthia_samples`` + ``SynthiaLabel``) over texdigits written at
    ``data_hw`` in the SYNTHIA-SEQS layout (16-bit label PNGs), with the training transform."""
    from study.data.base import SegmentationDataset
    from study.data.synthia import SynthiaLabel, synthia_samples
    from study.data.texdigits import TexDigitsParams, ensure_texdigits
    from study.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, SegTransform

    h, w = sizes.data_hw
    params = TexDigitsParams(num_train=sizes.data_images, num_val=1, num_test=1, height=h, width=w)
    _, samples = synthia_samples(ensure_texdigits(root, params), "manifest", 0)
    tf = SegTransform(mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, train=True, hflip=True)
    return SegmentationDataset(samples["train"], SynthiaLabel(), tf, "train", NUM_CLASSES)


def section_data(sizes: Sizes, device: torch.device, consume: float, tmp: Path) -> list[Row]:
    from torch.utils.data import DataLoader, RandomSampler

    t0 = time.perf_counter()
    dataset = _texdigits_dataset(tmp / "texdigits", sizes)
    gen_s = time.perf_counter() - t0
    bs = sizes.step.batch
    rows = []
    for workers in sizes.workers:
        sampler = RandomSampler(dataset, replacement=True, num_samples=bs * (sizes.data_batches + 2 * max(workers, 1)),
                                generator=torch.Generator().manual_seed(0))
        loader = DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        stream = iter(loader)
        for _ in range(max(workers, 1)):  # worker start-up and the first prefetched batches
            next(stream)
        t = time.perf_counter()
        for _ in range(sizes.data_batches):
            images, _ = next(stream)
            images.to(device, non_blocking=True)
        _sync(device)
        rate = sizes.data_batches * bs / (time.perf_counter() - t)
        del stream
        rows.append(Row("data", f"SYNTHIA reader, texdigits {sizes.data_hw[0]}x{sizes.data_hw[1]}, {workers} workers",
                        f"{rate:.1f} images/s", f"{rate / consume:.2f}x the bf16 + channels_last step's "
                        f"{consume:.1f} images/s; {sizes.data_batches} batches of {bs}"))
    rows[0].note += f"; texdigits written in {gen_s:.1f} s ({sizes.data_images} + 2 images)"
    return rows


# ----------------------------------------------------------------------------------- 5. packed
def pack_config(sizes: Sizes, device: torch.device) -> dict:
    setup = replace(sizes.step, bf16=True, channels_last=True)
    return {"setup": asdict(setup), "device": str(device), "warmup": sizes.pack_warmup, "iters": sizes.pack_iters,
            "threads": 1 if device.type == "cpu" else max(1, (os.cpu_count() or 2) // 4)}


def section_packed(sizes: Sizes, device: torch.device) -> list[Row]:
    from benchmarks._device_pack import packed_worker

    ctx = mp.get_context("spawn")
    rows, single = [], None
    for k in sizes.pack_ks:
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=packed_worker, args=(pack_config(sizes, device), barrier, results))
                 for _ in range(k)]
        for p in procs:
            p.start()
        got = [results.get(timeout=900) for _ in range(k)]
        for p in procs:
            p.join(timeout=60)
        errors = [r["error"] for r in got if "error" in r]
        if errors:
            raise RuntimeError(f"packed k={k}: {errors[0]}")
        total = sum(r["it_s"] for r in got)
        single = single or total
        mem = ", ".join(f"{r['peak_mib']:.0f}" for r in got)
        per_run = ", ".join(f"{r['it_s']:.2f}" for r in got)
        rows.append(Row("packed", f"k={k} runs of the bf16 + channels_last step on one {device.type} device",
                        f"{total:.2f} it/s aggregate", f"{total / single:.2f}x k=1; per run {per_run} it/s; "
                        f"peak memory ({got[0]['memory']}) per run {mem} MiB"))
    return rows


# ----------------------------------------------------------------------------------- 6. resume
def _tiny_model() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout2d(0.1),
                         nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(16, 4, 1))


def _resume_batch(step: int, hw: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of step ``step``: a pure function of the step (images whose classes follow the colour)."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.rand(4, 3, *hw, generator=g)
    target = images.argmax(1) + (images.mean(1) > 0.5).long()  # 4 classes
    return images.to(device), target.to(device)


def _train_tiny(device: torch.device, start: int, stop: int, state: dict | None) -> dict:
    torch.manual_seed(0)
    model = _tiny_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    model.train()
    for step in range(start, stop):
        images, target = _resume_batch(step, (32, 64), device)
        loss = F.cross_entropy(model(images), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    buf = io.BytesIO()  # the checkpoint goes through serialisation, as on disk
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, buf)
    buf.seek(0)
    return torch.load(buf, map_location=device, weights_only=False)


def _tiny_miou(state: dict, device: torch.device) -> float:
    from study.metrics import ConfusionMatrix

    model = _tiny_model().to(device)
    model.load_state_dict(state["model"])
    model.eval()
    cm = ConfusionMatrix(4, device=device)
    with torch.no_grad():
        for step in range(10_000, 10_004):
            images, target = _resume_batch(step, (32, 64), device)
            cm.update(model(images).argmax(1), target)
    return float(cm.compute()["miou"])


def section_resume(sizes: Sizes, device: torch.device) -> list[Row]:
    n = sizes.resume_steps
    straight = _train_tiny(device, 0, n, None)
    half = _train_tiny(device, 0, n // 2, None)
    resumed = _train_tiny(device, n // 2, n, half)
    m_straight, m_resumed = _tiny_miou(straight, device), _tiny_miou(resumed, device)
    dw = max(float((straight["model"][k].double() - resumed["model"][k].double()).abs().max())
             for k in straight["model"] if straight["model"][k].is_floating_point())
    return [Row("resume", f"tiny net, {n} Adam steps straight vs {n // 2} + checkpoint + {n - n // 2}, on "
                f"{device.type}", f"|delta mIoU| = {abs(m_straight - m_resumed) * 100:.4f} points",
                f"mIoU straight {m_straight * 100:.4f}, resumed {m_resumed * 100:.4f}; max |delta weight| {dw:.3g}")]


# ----------------------------------------------------------------------------------- driver
def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    text = f"CPU {cpu} ({os.cpu_count()} CPUs); torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += (f"; GPU {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), CUDA "
                 f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        text += "; no GPU (CPU run)"
    return text


def run_all(sizes: Sizes, device: torch.device) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="device-check-"))
    try:
        rows, consume = section_step(sizes, device)
        rows += section_loss(sizes, device)
        rows += section_confusion(sizes, device)
        rows += section_data(sizes, device, consume, tmp)
        rows += section_packed(sizes, device)
        rows += section_resume(sizes, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def render(rows: list[Row], header: list[str]) -> str:
    """The Markdown document: title, header lines, one table."""
    cells = [("section", "what", "value", "note")] + [
        tuple(v.replace("|", "\\|") for v in (r.section, r.what, r.value, r.note)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(["# Device check", "", *header, "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (rot check, not a measurement)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("device check: no CUDA device available; the full check needs a GPU (--smoke runs the CPU smoke "
              "version); nothing written", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run_all(sizes, device)
    mode = ("SMOKE RUN on CPU at tiny sizes (see each row): these are NOT GPU numbers and say nothing about "
            "the study's speed; they only show that every section runs" if args.smoke else
            "full run on the GPU (sizes as listed per row)")
    header = [f"- Mode: {mode}", f"- Command: `python -m benchmarks.device{' --smoke' if args.smoke else ''}`",
              f"- Started: {started.isoformat(timespec='seconds')}, took {time.perf_counter() - t0:.0f} s",
              f"- Machine: {machine(device)}", f"- Load before: {load:.2f} (1-min average)"]
    text = render(rows, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

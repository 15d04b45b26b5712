"""Peak memory of a demo run: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a child
``python -m study run`` on the demo spec (``benchmarks/_demo.py``) with a few iterations, a real
sqlite store and checkpoints in a temporary folder. Each measurement runs in its own intermediate
Python process, so no earlier child of this process can own the maximum. Reference: the same for
``python -c "import torch"`` and ``python -c "import study.train"``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks._common import ROOT_ENV, Row
from benchmarks._demo import ROOT, demo_spec
from study.spec import to_dict

NAME = "memory"

_PROBE = """
import resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if proc.returncode:
    sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
    sys.exit(proc.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, wall)
"""


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run as a grandchild."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *cmd], cwd=ROOT, env=ROOT_ENV(), capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-1500:]}")
    kib, wall = out.stdout.split()
    return int(kib) / 1024, float(wall)


def run(quick: bool = False) -> list[Row]:
    iterations = 4 if quick else 10
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        spec, source = demo_spec(tmp, iterations=iterations, eval_interval=iterations // 2,
                                 log_interval=2)
        path = tmp / "spec.yaml"
        path.write_text(yaml.safe_dump(to_dict(spec)))
        rss, wall = peak_rss([sys.executable, "-m", "study", "run", str(path)])
        torch_rss, _ = peak_rss([sys.executable, "-c", "import torch"])
        train_rss, _ = peak_rss([sys.executable, "-c", "import study.train"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = spec.data.texdigits
    return [Row(f"memory: peak RSS of `python -m study run` ({iterations} it, {spec.model.arch}/{spec.model.backbone}, "
                f"texdigits {t.height}x{t.width} batch {spec.train.batch_size}, 2 evals; {wall:.0f} s) [{source}]",
                f"{rss:.0f} MiB", f"{torch_rss:.0f} MiB (import torch); {train_rss:.0f} MiB (import study.train)",
                f"{rss / torch_rss:.2f}x", "report", "-")]

"""``python -m benchmarks [--quick] [--only NAME[,NAME...]]``: run the benchmarks, print one table."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks._common import Row, format_table, load_note  # noqa: E402


def machine() -> str:
    """CPU model, core count, torch version."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help=f"run only these benchmarks (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; valid names: {', '.join(BENCHMARKS)}")

    import torch

    torch.set_num_threads(2)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {machine()}", flush=True)
    print(f"# {'quick' if args.quick else 'full'} run: {', '.join(names)}", flush=True)
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
        before = load_note()
        t = time.perf_counter()
        try:
            new = module.run(quick=args.quick)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            new = [Row(name, f"ERROR {type(err).__name__}: {err}"[:200], met="ERROR")]
        elapsed = time.perf_counter() - t
        for row in new:
            print(f"  {row.benchmark}: {row.measured} | base {row.baseline} | {row.ratio} | {row.target} "
                  f"| {row.met}", flush=True)
        print(f"# {name}: {elapsed:.0f} s; {before} before, {load_note()} after", flush=True)
        rows.extend(new)
    print()
    print(format_table(rows))
    return 1 if any(r.met == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

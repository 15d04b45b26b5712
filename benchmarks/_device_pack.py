"""Worker of the packed-runs section of ``benchmarks.device``: one process = one training run.

Each worker builds the step model on the shared device, warms up, waits at a barrier with the other
workers of its group, then times ``iters`` training steps and reports its it/s and its peak memory
(``torch.cuda.max_memory_allocated`` on CUDA; peak RSS of the process on CPU).
"""

from __future__ import annotations

import resource
import time
import traceback


def packed_worker(cfg: dict, barrier, results) -> None:
    """Run one training loop (``cfg`` from ``benchmarks.device.pack_config``) and put
    ``{"it_s", "peak_mib", "memory"}`` (or ``{"error"}``) on ``results``."""
    try:
        import torch

        from benchmarks.device import StepSetup, make_step

        torch.set_num_threads(cfg["threads"])
        device = torch.device(cfg["device"])
        setup = StepSetup(**cfg["setup"])
        step = make_step(setup, device)
        for _ in range(cfg["warmup"]):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        barrier.wait(timeout=600)
        t0 = time.perf_counter()
        for _ in range(cfg["iters"]):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"
        results.put({"it_s": cfg["iters"] / elapsed, "peak_mib": peak, "memory": kind})
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails the section
        try:
            barrier.abort()
        finally:
            results.put({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"})


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)

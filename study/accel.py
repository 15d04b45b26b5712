"""GPU speed settings of the trainer: TF32, cuDNN autotuning, channels_last, torch.compile, fused
optimizers and deterministic algorithms. Every setting defaults to "off", which leaves torch exactly
as it is (today's numerics); on CPU every helper is the identity except :func:`deterministic`.

Resume tolerance policy (CUDA)
------------------------------
On CPU a run stopped at a checkpoint and resumed reproduces the uninterrupted run bit for bit (same
weights, same metrics). On CUDA it does not in general: bilinear upsampling backward and
``index_add``/``scatter_add`` on floating tensors accumulate with atomics, cuDNN may pick other
kernels after a restart when ``cudnn.benchmark`` is on, and TF32/bf16 change rounding, so the two
runs drift apart by floating-point reordering that grows with the number of steps. The policy:

- the resumed run must start from exactly the saved state (weights, optimizer moments, schedule,
  sampler position, RNG states): that part is exact on every device;
- after resuming, the final metrics of a CUDA run may differ from those of an uninterrupted run by
  floating-point reordering; the accepted bound is ``|delta mIoU| <= 0.5`` point (a chosen bound,
  not a measurement; ``python -m benchmarks.device`` measures the difference on a small run);
- ``deterministic(True)`` (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN
  deterministic, no autotuning, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``) removes every source torch
  offers a deterministic kernel for; ops without one (bilinear upsampling backward on CUDA) warn
  instead of failing, so the drift shrinks but is not guaranteed to vanish.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

__all__ = ["FUSED_OPTIMIZERS", "configure_backends", "deterministic", "input_memory_format", "optimizer_kwargs",
           "prepare_model", "unwrap"]

FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def configure_backends(device: torch.device | str, *, tf32: bool, cudnn_benchmark: bool) -> dict[str, object]:
    """Set the CUDA backend flags for a run on ``device``; returns what was set (for logging).

    ``tf32=True``: float32 matmuls and cuDNN convolutions may use TF32 tensor cores (10-bit
    mantissa inputs, float32 accumulation). ``tf32=False`` leaves torch's defaults untouched
    (matmuls IEEE float32; cuDNN convolutions TF32, torch's own default). ``cudnn_benchmark=True``
    lets cuDNN time its algorithms on the first call of each input shape (worth it when shapes are
    fixed, as with a fixed crop). On a non-CUDA device nothing is set and ``{}`` is returned.
    """
    if not _is_cuda(device):
        return {}
    applied: dict[str, object] = {}
    if tf32:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        applied["cudnn_benchmark"] = True
    return applied


def input_memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format to give input images: ``images.to(device, memory_format=...)``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare_model(model: nn.Module, *, channels_last: bool, compile: bool,
                  compile_backend: str = "inductor") -> nn.Module:
    """``model`` with its 4-D weights in channels_last layout (in place) and/or wrapped by
    ``torch.compile``; both off returns ``model`` itself.

    The compiled wrapper shares the parameters of ``model``: build the optimizer from either, but
    save and load state dicts through :func:`unwrap` so checkpoint keys stay those of the plain
    module (``torch.compile`` prefixes them with ``_orig_mod.``).
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, backend=compile_backend)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper (``model`` itself if not compiled)."""
    return getattr(model, "_orig_mod", model)


def optimizer_kwargs(name: Literal["adam", "adamw", "sgd"] | str, device: torch.device | str,
                     fused: bool) -> dict[str, bool]:
    """Extra keyword arguments for ``torch.optim.<name>``: ``{"fused": True}`` when ``fused`` is set
    and the run is on CUDA (one kernel per step for all parameters instead of a loop of small
    ones; same update rule), else ``{}`` (so CPU runs keep today's implementation).

    ``ValueError`` when ``fused`` is requested for an optimizer without a fused implementation.
    """
    if not fused:
        return {}
    if name not in FUSED_OPTIMIZERS:
        raise ValueError(f"train.fused_optimizer: True is not allowed for optimizer {name!r} "
                         f"(allowed: one of {list(FUSED_OPTIMIZERS)})")
    return {"fused": True} if _is_cuda(device) else {}


def deterministic(flag: bool) -> None:
    """Ask torch for deterministic kernels (``flag=True``) or restore the defaults (``False``).

    True: ``torch.use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.deterministic``,
    no cuDNN autotuning, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (it must be set
    before the first cuBLAS call of the process to take effect). See the module docstring for what
    this does and does not guarantee on CUDA.
    """
    if flag:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False

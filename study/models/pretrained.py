"""Pretrained backbone weights from local files only: an explicit path or the torchvision cache.

Nothing here downloads. ``"imagenet"`` means torchvision's ``IMAGENET1K_V1`` file of the backbone,
looked up in ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

__all__ = ["imagenet_checkpoint_path", "load_state_file", "resolve_pretrained", "copy_matching"]

CLASSIFIER_PREFIXES = ("fc.", "classifier.")

# our backbone name -> torchvision classification model whose ImageNet file it takes
TORCHVISION_NAME = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_large": "mobilenet_v3_large",
    "mobilenet_v3_small": "mobilenet_v3_small",
    "paper_resnet18": "resnet18",
}


def imagenet_checkpoint_path(backbone: str) -> tuple[Path, str]:
    """(expected local path, original URL) of torchvision's IMAGENET1K_V1 weights for ``backbone``."""
    if backbone not in TORCHVISION_NAME:
        raise ValueError(f"no ImageNet weights known for backbone {backbone!r}; known: {sorted(TORCHVISION_NAME)}")
    url = torchvision.models.get_model_weights(TORCHVISION_NAME[backbone])["IMAGENET1K_V1"].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict saved with ``torch.save`` (``weights_only=True``); unwraps a
    ``{"state_dict": ...}`` / ``{"model": ...}`` container and a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def resolve_pretrained(pretrained: str | os.PathLike, backbone: str) -> dict[str, torch.Tensor]:
    """State dict named by ``pretrained``: ``"imagenet"`` (torchvision cache) or a file path."""
    if str(pretrained) == "imagenet":
        path, url = imagenet_checkpoint_path(backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for backbone {backbone!r} not found at {path}. Nothing is downloaded: "
                f"copy the file {path.name} (torchvision's {url}) to {path} (the cache is "
                f"$TORCH_HOME/hub/checkpoints), or set model.pretrained to the path of a .pth state dict."
            )
        return load_state_file(path)
    return load_state_file(pretrained)


def copy_matching(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "", strict: bool = True) -> float:
    """Copy ``state[prefix + name]`` into ``module``'s state entry ``name`` where the shapes agree.

    Returns the fraction of ``module``'s state (parameters and buffers, counted in elements) that
    was filled. With ``strict``, every entry except BatchNorm's ``num_batches_tracked`` must
    be present with the right shape and ``state`` may hold nothing else but a classifier
    (``fc.*`` / ``classifier.*``), else ``ValueError``."""
    own = module.state_dict()
    new, missing, mismatched = {}, [], []
    for name, tensor in own.items():
        src = state.get(prefix + name)
        if src is None:
            if not name.endswith("num_batches_tracked"):
                missing.append(prefix + name)
        elif tuple(src.shape) != tuple(tensor.shape):
            mismatched.append(f"{prefix + name} {tuple(src.shape)} vs {tuple(tensor.shape)}")
        else:
            new[name] = src
    used = {prefix + name for name in own}
    unexpected = [k for k in state if k not in used and not k.startswith(CLASSIFIER_PREFIXES)]
    if strict and (missing or mismatched or unexpected):
        raise ValueError(
            f"pretrained state does not fit the backbone: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    module.load_state_dict(new, strict=False)
    return sum(t.numel() for t in new.values()) / sum(t.numel() for t in own.values())

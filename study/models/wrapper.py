"""One output contract for every segmentation network: logits ``[N, C, H, W]`` at input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationNet"]


class SegmentationNet(nn.Module):
    """Wraps a library network so that ``forward(x[N,3,H,W]) -> logits[N,C,H,W]`` (a tensor).

    - torchvision segmentation models return ``{"out": ...}``: the ``"out"`` entry is returned.
    - Networks that need ``H, W`` divisible by ``pad_to`` (smp's DeepLabV3+ concatenates stride-4
      and upsampled stride-16 features) get the input zero-padded at the bottom/right and the
      logits cropped back, so any input size works.

    - ``forward(x, return_features=True)`` returns ``(logits, features)``: the output of the submodule
      ``features_path`` of ``net`` (captured by a forward hook), cropped like the logits to the part
      covering the unpadded input; ``ValueError`` when the network names no ``features_path``.

    ``backbone`` is the ImageNet-pretrainable part (a submodule of ``net``), ``arch`` and
    ``backbone_name`` name the combination, ``pretrained_fraction`` is the fraction of backbone
    state filled from pretrained weights (``None`` when built from scratch).
    """

    def __init__(self, net: nn.Module, backbone_path: str, arch: str, backbone_name: str, pad_to: int = 1,
                 features_path: str | None = None, feature_channels: int | None = None):
        super().__init__()
        self.net = net
        self.backbone_path = backbone_path
        self.arch = arch
        self.backbone_name = backbone_name
        self.pad_to = int(pad_to)
        self.features_path = features_path
        self._feature_channels = feature_channels
        self.pretrained_fraction: float | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.net.get_submodule(self.backbone_path)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.pad_to, (-w) % self.pad_to
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        captured: list[torch.Tensor] = []
        if return_features:
            if self.features_path is None:
                raise ValueError(f"{self.arch}/{self.backbone_name} does not expose features (no features_path)")
            hook = self.net.get_submodule(self.features_path).register_forward_hook(
                lambda _m, _i, o: captured.append(o))
        try:
            out = self.net(x)
        finally:
            if return_features:
                hook.remove()
        if isinstance(out, dict):
            out = out["out"]
        if ph or pw:
            out = out[..., :h, :w]
        if not return_features:
            return out
        feats = captured[-1]
        fh, fw = -(-h * feats.shape[-2] // x.shape[-2]), -(-w * feats.shape[-1] // x.shape[-1])
        return out, feats[..., :fh, :fw]

    @property
    def feature_channels(self) -> int | None:
        """Channels of the features ``forward(x, return_features=True)`` returns (None if none)."""
        if self.features_path is None:
            return None
        return self._feature_channels or getattr(self.net, "feature_channels", None)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, backbone={self.backbone_name!r}, pad_to={self.pad_to}"

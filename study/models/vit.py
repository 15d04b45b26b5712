"""A small plain-ViT segmentation network on timm's ``VisionTransformer`` (trains on a CPU).

Encoder: timm ``VisionTransformer`` with a class token, patch size = output stride (8 or 16),
``dynamic_img_size=True`` (the position embedding, a 28 x 28 grid for ``img_size=224 // 8 * patch``,
is interpolated to each input's patch grid) and ``dynamic_img_pad=True`` (inputs are zero-padded at
the bottom/right to a multiple of the patch), so any image size works. Patch tokens are reshaped to a
map ``[N, D, ceil(H/p), ceil(W/p)]`` (:class:`TokenMap`), the network's deep features;
``encoder(x)`` returns ``[map]`` like the other backbones' feature lists.
Decoder: 3x3 conv + BatchNorm + ReLU, 1x1 conv to the classes, bilinear upsampling by ``p`` and a crop
to ``H x W``.

``forward(x) -> logits [N, C, H, W]``; ``forward(x, return_features=True) -> (logits, features)``.
Nothing downloads: pretrained weights come only from a local state-dict file in timm's naming for
the same configuration (``build_model(..., pretrained=path)`` copies it into ``encoder``).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["VIT_CONFIGS", "TokenMap", "ViTEncoder", "ViTSegmenter", "build_vit"]

# backbone -> (embed_dim, depth, num_heads)
VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (96, 4, 3),
    "vit_small": (192, 6, 3),
}


class TokenMap(nn.Module):
    """Patch tokens ``[N, prefix + h*w, D]`` -> map ``[N, D, h, w]`` for an input of ``size`` (H, W)."""

    def __init__(self, patch_size: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = (math.ceil(s / self.patch_size) for s in size)
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class ViTEncoder(VisionTransformer):
    """timm's VisionTransformer (same parameter names) whose ``forward(x)`` returns ``[token map]``,
    the feature-list contract of the other backbones; the map is the output of ``self.token_map``."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int) -> None:
        super().__init__(img_size=224 // 8 * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, num_classes=0, global_pool="", class_token=True,
                         dynamic_img_size=True, dynamic_img_pad=True)
        self.token_map = TokenMap(patch_size, self.num_prefix_tokens)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [self.token_map(self.forward_features(x), (x.shape[-2], x.shape[-1]))]


class ViTSegmenter(nn.Module):
    """Plain ViT encoder + light conv decoder; see the module docstring."""

    def __init__(self, num_classes: int, embed_dim: int = 96, depth: int = 4, num_heads: int = 3,
                 patch_size: int = 8) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.encoder = ViTEncoder(patch_size, embed_dim, depth, num_heads)
        self.decoder = nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        self.feature_channels = embed_dim

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        size = (x.shape[-2], x.shape[-1])
        features = self.encoder(x)[-1]
        logits = self.classifier(self.decoder(features))
        logits = F.interpolate(logits, scale_factor=self.patch_size, mode="bilinear", align_corners=False)
        logits = logits[..., :size[0], :size[1]]
        return (logits, features) if return_features else logits


def build_vit(backbone: str, num_classes: int, output_stride: int):
    """``backbone`` in :data:`VIT_CONFIGS` with patch size = ``output_stride``, in a SegmentationNet
    whose ``backbone`` is the timm encoder and whose features are the token map."""
    from .wrapper import SegmentationNet

    embed_dim, depth, heads = VIT_CONFIGS[backbone]
    net = ViTSegmenter(num_classes, embed_dim, depth, heads, patch_size=output_stride)
    return SegmentationNet(net, "encoder", "vit", backbone, features_path="encoder.token_map")


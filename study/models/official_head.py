"""The released code's DeepLabV3+ head (ASPP + decoder), on any encoder that yields a feature pyramid.

Architecture as released with the paper (PotatoTian/recall-semseg, ptsemseg's DeepLab, itself the
pytorch-deeplab-xception head; Chen et al. 2018, "Encoder-Decoder with Atrous Separable
Convolution", Fig. 2 and Sec. 4.1, with plain instead of separable convolutions):

ASPP on the deepest features (``in_channels``, 2048 for the Bottleneck ResNets):
  five branches of 256 channels, each conv (no bias) + BN + ReLU: a 1x1 conv, three 3x3 convs with
  dilation ``rates`` (padding = rate), and image pooling (global average pool, 1x1 conv, upsampled
  back bilinearly with ``align_corners=True``); concatenated (1280) -> 1x1 conv 1280->256 (no bias)
  + BN + ReLU + Dropout(0.5).
Decoder:
  low-level (stride-4) features -> 1x1 conv ->48 (no bias) + BN + ReLU; the ASPP output upsampled
  bilinearly (``align_corners=True``) to their size and concatenated first (256 + 48 = 304);
  3x3 conv 304->256 (no bias) + BN + ReLU + Dropout(0.5); 3x3 conv 256->256 (no bias) + BN + ReLU +
  Dropout(0.1); 1x1 conv 256->C with bias.
Output: the logits upsampled bilinearly (``align_corners=True``) to the input size; no padding, so
any input size works as released.

Initialisation as released: ``kaiming_normal_`` (fan-in, ReLU gain) on every head conv weight, BN
weight 1 and bias 0, the classifier's bias left at PyTorch's default.

Parameters (with 2048 deep and 256 low-level channels, C classes): ASPP 15,535,104; decoder
1,303,648 + 257 C (1,307,760 at C = 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP_DROPOUT", "DECODER_DROPOUTS", "OfficialASPP", "OfficialDecoder", "OfficialDeepLabV3Plus"]

ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
ASPP_DROPOUT = 0.5
DECODER_DROPOUTS = (0.5, 0.1)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel_size == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def init_released(module: nn.Module) -> None:
    """Released initialisation: kaiming-normal conv weights, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OfficialASPP(nn.Module):
    """ASPP: [1x1, 3x3 @ rates..., image pooling] x 256 ch -> 1x1 1280->256 + BN + ReLU + Dropout(0.5)."""

    def __init__(self, in_channels: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, ASPP_CHANNELS, 1)]
            + [_conv_bn_relu(in_channels, ASPP_CHANNELS, 3, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, ASPP_CHANNELS, 1))
        n_branches = len(self.branches) + 1
        self.project = nn.Sequential(*_conv_bn_relu(n_branches * ASPP_CHANNELS, ASPP_CHANNELS, 1),
                                     nn.Dropout(ASPP_DROPOUT))
        init_released(self)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(_upsample(self.image_pool(x), x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class OfficialDecoder(nn.Module):
    """Low-level 1x1 ->48; concat [upsampled ASPP, low-level]; 3x3 + Dropout(0.5), 3x3 + Dropout(0.1), 1x1 ->C."""

    def __init__(self, low_level_channels: int, num_classes: int) -> None:
        super().__init__()
        self.low_level = _conv_bn_relu(low_level_channels, LOW_LEVEL_CHANNELS, 1)
        fused = ASPP_CHANNELS + LOW_LEVEL_CHANNELS
        self.fuse = nn.Sequential(
            *_conv_bn_relu(fused, ASPP_CHANNELS, 3), nn.Dropout(DECODER_DROPOUTS[0]),
            *_conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3), nn.Dropout(DECODER_DROPOUTS[1]),
            nn.Conv2d(ASPP_CHANNELS, num_classes, 1, bias=True),
        )
        init_released(self)

    def forward(self, aspp_out: Tensor, low_level: Tensor) -> Tensor:
        low = self.low_level(low_level)
        return self.fuse(torch.cat([_upsample(aspp_out, low.shape[-2:]), low], dim=1))


class OfficialDeepLabV3Plus(nn.Module):
    """``encoder`` (smp-style: ``forward(x)`` returns a list of features, ``[2]`` at stride 4 and
    ``[-1]`` the deepest, channel counts in ``encoder.out_channels``) + :class:`OfficialASPP` +
    :class:`OfficialDecoder`; logits upsampled to the input size (bilinear, ``align_corners=True``)."""

    def __init__(self, encoder: nn.Module, num_classes: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.out_channels)
        self.aspp = OfficialASPP(channels[-1], rates)
        self.decoder = OfficialDecoder(channels[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        logits = self.decoder(self.aspp(features[-1]), features[2])
        return _upsample(logits, x.shape[-2:])

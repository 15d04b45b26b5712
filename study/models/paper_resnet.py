"""The released code's "resnet18" backbone inside a DeepLabV3+ head.

The released (ptsemseg / pytorch-deeplab-xception based) code builds its "resnet18" as a ResNet of
*Bottleneck* blocks: layers [2, 2, 2] and a multi-grid layer4 of 3 blocks with unit rates [1, 2, 4]
times the layer dilation (2 at output stride 16, 4 at 8), so 2048 output channels and ~18.4 M
backbone parameters, not torchvision's BasicBlock ResNet-18 (11.2 M, 512 channels). Only the
entries whose names and shapes coincide with torchvision's ResNet-18 can take its ImageNet weights.

Here it is torchvision's ``ResNet``/``Bottleneck`` (smp's ResNet-50 encoder, truncated), under one
of two heads (``build_model(..., decoder=...)``):

- ``"smp"`` (default): segmentation_models_pytorch's DeepLabV3+ head, as on the other
  ``deeplabv3plus`` backbones. It is NOT the released head: after the ASPP (which, like the
  released one, ends with Dropout(0.5)) smp adds a 3x3 depthwise-separable conv + BN + ReLU, and it
  fuses the concatenated 304 channels with ONE 3x3 depthwise-separable conv + BN + ReLU and no
  dropout, then a 1x1 classifier upsampled x4. With 16 classes the network has 34,109,792
  parameters.
- ``"official"``: the released head (:mod:`study.models.official_head`: two full 3x3 convs with
  Dropout(0.5) and Dropout(0.1), kaiming-normal init); 35,251,632 parameters with 16 classes
  (backbone 18,408,768 + ASPP 15,535,104 + decoder 1,307,760), as the released network.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .official_head import OfficialDeepLabV3Plus
from .pretrained import copy_matching
from .wrapper import SegmentationNet

__all__ = ["LAYERS", "MULTI_GRID", "build_paper_deeplabv3plus", "build_paper_official", "load_paper_backbone_imagenet",
           "set_stage_dilation", "truncate_to_paper_resnet"]

LAYERS = (2, 2, 2)
MULTI_GRID = (1, 2, 4)


def set_stage_dilation(stage: nn.Sequential, rates: list[int]) -> None:
    """Make a ResNet stage stride-1 with dilation ``rates[i]`` on every 3x3 conv of block ``i``
    (padding = rate keeps the spatial size), as DeepLab's dilated ResNets do."""
    if len(rates) != len(stage):
        raise ValueError(f"need one rate per block: {len(stage)} blocks, rates {rates}")
    for block, rate in zip(stage, rates):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = (rate, rate)
                    conv.padding = (rate, rate)


def build_paper_deeplabv3plus(num_classes: int, output_stride: int, aspp_rates: tuple[int, int, int]) -> SegmentationNet:
    """smp's DeepLabV3+ (ASPP 1x1 + ``aspp_rates``, 48-channel low-level projection) on the paper backbone."""
    net = smp.DeepLabV3Plus(
        encoder_name="resnet50",  # Bottleneck ResNet with 2048 output channels; truncated below
        encoder_weights=None,
        encoder_output_stride=output_stride,
        decoder_atrous_rates=aspp_rates,
        decoder_aspp_separable=False,
        classes=num_classes,
    )
    truncate_to_paper_resnet(net.encoder, output_stride)
    return SegmentationNet(net, "encoder", "deeplabv3plus", "paper_resnet18", pad_to=output_stride)


def build_paper_official(num_classes: int, output_stride: int, aspp_rates: tuple[int, int, int]) -> SegmentationNet:
    """The released network: the paper backbone under the released DeepLabV3+ head (no input padding)."""
    encoder = smp.encoders.get_encoder("resnet50", weights=None, output_stride=output_stride)
    truncate_to_paper_resnet(encoder, output_stride)
    net = OfficialDeepLabV3Plus(encoder, num_classes, aspp_rates)
    return SegmentationNet(net, "encoder", "deeplabv3plus", "paper_resnet18")


def truncate_to_paper_resnet(enc: nn.Module, output_stride: int) -> None:
    """Cut smp's ResNet-50 encoder down to the paper backbone, in place: layers [2, 2, 2] and a
    3-block layer4 dilated by the multi-grid rates times 2 (output stride 16) or 4 (8)."""
    enc.layer1 = enc.layer1[: LAYERS[0]]
    enc.layer2 = enc.layer2[: LAYERS[1]]
    enc.layer3 = enc.layer3[: LAYERS[2]]
    assert len(enc.layer4) == len(MULTI_GRID)
    if output_stride == 8:
        set_stage_dilation(enc.layer3, [2] * LAYERS[2])
    layer_dilation = {16: 2, 8: 4}[output_stride]
    set_stage_dilation(enc.layer4, [g * layer_dilation for g in MULTI_GRID])


def load_paper_backbone_imagenet(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> float:
    """Copy the tensors of a torchvision ResNet-18 ``state_dict`` whose names and shapes match the
    paper backbone's; returns the fraction of backbone state filled, in elements (~34 %)."""
    backbone = model.backbone if isinstance(model, SegmentationNet) else model
    fraction = copy_matching(backbone, state_dict, strict=False)
    if isinstance(model, SegmentationNet):
        model.pretrained_fraction = fraction
    return fraction

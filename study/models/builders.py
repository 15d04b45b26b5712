"""``build_model(arch, backbone, num_classes, output_stride, pretrained, decoder)``: every network of the study.

- ``deeplabv3plus``: DeepLabV3+ (Chen et al. 2018; ASPP without separable convs, rates
  [1, 6, 12, 18] at output stride 16 and [1, 12, 24, 36] at 8, 48-channel low-level projection) on
  smp's encoders, plus ``paper_resnet18``, the released code's Bottleneck "resnet18". Its head is
  ``decoder="smp"`` (segmentation_models_pytorch's, the default) or ``decoder="official"`` (the
  released code's, :mod:`study.models.official_head`).
- ``deeplabv3``: torchvision DeepLabV3 (ResNets assembled from torchvision's parts so that the
  output stride is selectable; output stride 8 reproduces ``deeplabv3_resnet50/101`` exactly).
- ``lraspp``: torchvision LR-ASPP on MobileNetV3 large / small (output stride 16).
- ``vit``: a small timm ViT (``study.models.vit``), patch size = output stride (8 or 16).

``pretrained``: ``None``; ``"imagenet"`` (torchvision's file in ``$TORCH_HOME/hub/checkpoints``);
or a path to a backbone state dict in torchvision's naming. Nothing downloads.
"""

from __future__ import annotations

import os
from typing import Callable, Literal

import segmentation_models_pytorch as smp
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from .official_head import OfficialDeepLabV3Plus
from .paper_resnet import build_paper_deeplabv3plus, build_paper_official, load_paper_backbone_imagenet, set_stage_dilation
from .pretrained import copy_matching, resolve_pretrained
from .vit import VIT_CONFIGS, build_vit
from .wrapper import SegmentationNet

__all__ = ["DECODER_CHOICES", "MODEL_CHOICES", "build_model", "output_strides"]

MODEL_CHOICES: dict[str, tuple[str, ...]] = {
    "deeplabv3plus": ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "paper_resnet18"),
    "deeplabv3": ("resnet18", "resnet50", "resnet101", "mobilenet_v3_large"),
    "lraspp": ("mobilenet_v3_large", "mobilenet_v3_small"),
    "vit": tuple(VIT_CONFIGS),
}

DECODER_CHOICES = ("smp", "official")

_FIXED_OS16 = {("deeplabv3", "mobilenet_v3_large"), ("lraspp", "mobilenet_v3_large"), ("lraspp", "mobilenet_v3_small")}


def output_strides(arch: str, backbone: str) -> tuple[int, ...]:
    """Output strides supported by ``arch``/``backbone``."""
    _check_combo(arch, backbone)
    return (16,) if (arch, backbone) in _FIXED_OS16 else (8, 16)


def _check_combo(arch: str, backbone: str) -> None:
    if arch not in MODEL_CHOICES:
        raise ValueError(f"unknown model arch {arch!r}; valid: {sorted(MODEL_CHOICES)}")
    if backbone not in MODEL_CHOICES[arch]:
        valid = ", ".join(f"{a}: {list(b)}" for a, b in MODEL_CHOICES.items())
        raise ValueError(f"backbone {backbone!r} is not available for arch {arch!r}; valid combinations: {valid}")


def _check_decoder(arch: str, decoder: str) -> None:
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder: {decoder!r} is not allowed (allowed: {list(DECODER_CHOICES)})")
    if decoder == "official" and arch != "deeplabv3plus":
        raise ValueError(f"decoder: 'official' is not allowed for arch {arch!r} "
                         f"(allowed: 'smp', the library head; 'official' only with arch 'deeplabv3plus')")


def _aspp_rates(output_stride: int) -> tuple[int, int, int]:
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


# --------------------------------------------------------------------------- builders
def _smp_deeplabv3plus(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    net = smp.DeepLabV3Plus(
        encoder_name=backbone,
        encoder_weights=None,
        encoder_output_stride=output_stride,
        decoder_atrous_rates=_aspp_rates(output_stride),
        decoder_aspp_separable=False,
        classes=num_classes,
    )
    return SegmentationNet(net, "encoder", "deeplabv3plus", backbone, pad_to=output_stride,
                           features_path="decoder", feature_channels=256)  # smp's decoder_channels default


def _tv_deeplabv3_resnet(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    factory = getattr(torchvision.models, backbone)
    if backbone == "resnet18":  # BasicBlock refuses dilation at construction: dilate afterwards
        resnet = factory(weights=None)
        if output_stride == 8:
            set_stage_dilation(resnet.layer3, [2] * len(resnet.layer3))
        set_stage_dilation(resnet.layer4, [32 // output_stride] * len(resnet.layer4))
        channels = 512
    else:
        resnet = factory(weights=None, replace_stride_with_dilation=[False, output_stride == 8, True])
        channels = 2048
    body = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    net = DeepLabV3(body, DeepLabHead(channels, num_classes, atrous_rates=_aspp_rates(output_stride)))
    return SegmentationNet(net, "backbone", "deeplabv3", backbone)


def _tv_deeplabv3_mobilenet(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )
    return SegmentationNet(net, "backbone", "deeplabv3", backbone)


def _tv_lraspp(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    if backbone == "mobilenet_v3_large":
        net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        )
    else:  # same construction as torchvision's large builder, on the small MobileNetV3
        features = torchvision.models.mobilenet_v3_small(weights=None, dilated=True).features
        stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
        low, high = stages[-4], stages[-1]  # stride-8 and stride-16 features
        body = IntermediateLayerGetter(features, return_layers={str(low): "low", str(high): "high"})
        net = LRASPP(body, features[low].out_channels, features[high].out_channels, num_classes)
    return SegmentationNet(net, "backbone", "lraspp", backbone)


def _official_deeplabv3plus(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    """An smp encoder under the released DeepLabV3+ head (no input padding: outputs are resized)."""
    encoder = smp.encoders.get_encoder(backbone, weights=None, output_stride=output_stride)
    net = OfficialDeepLabV3Plus(encoder, num_classes, _aspp_rates(output_stride))
    return SegmentationNet(net, "encoder", "deeplabv3plus", backbone)


def _paper(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    return build_paper_deeplabv3plus(num_classes, output_stride, _aspp_rates(output_stride))


def _paper_official(backbone: str, num_classes: int, output_stride: int) -> SegmentationNet:
    return build_paper_official(num_classes, output_stride, _aspp_rates(output_stride))


def _builder(arch: str, backbone: str, decoder: str = "smp") -> Callable[[str, int, int], SegmentationNet]:
    if arch == "deeplabv3plus" and decoder == "official":
        return _paper_official if backbone == "paper_resnet18" else _official_deeplabv3plus
    if arch == "deeplabv3plus":
        return _paper if backbone == "paper_resnet18" else _smp_deeplabv3plus
    if arch == "vit":
        return build_vit
    if arch == "deeplabv3":
        return _tv_deeplabv3_mobilenet if backbone.startswith("mobilenet") else _tv_deeplabv3_resnet
    return _tv_lraspp


# torchvision state-dict prefix of the backbone's entries (IntermediateLayerGetter over `.features`)
_SOURCE_PREFIX = {("deeplabv3", "mobilenet_v3_large"): "features.", ("lraspp", "mobilenet_v3_large"): "features.",
                  ("lraspp", "mobilenet_v3_small"): "features."}


def build_model(
    arch: str,
    backbone: str,
    num_classes: int,
    output_stride: int = 16,
    pretrained: str | os.PathLike | None = None,
    decoder: Literal["smp", "official"] = "smp",
) -> SegmentationNet:
    """Build ``arch`` on ``backbone``; ``forward(x[N,3,H,W]) -> logits[N,num_classes,H,W]``.

    ``decoder`` (arch ``deeplabv3plus`` only): ``"smp"``, segmentation_models_pytorch's DeepLabV3+
    head (and the library head of the other archs); ``"official"``, the released code's head
    (ASPP + Dropout(0.5); two 3x3 convs with Dropout(0.5) / Dropout(0.1); see
    :mod:`study.models.official_head`). ``paper_resnet18`` with ``"official"`` is the released network.

    ``pretrained`` fills the backbone from a torchvision-named state dict: ``"imagenet"`` (local
    torchvision cache, ``FileNotFoundError`` naming the expected path if absent) or a file path.
    Every backbone entry must match, except for ``paper_resnet18``, which takes the entries of a
    torchvision ResNet-18 whose names and shapes match (``model.pretrained_fraction`` says how many).
    """
    _check_combo(arch, backbone)
    _check_decoder(arch, decoder)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    allowed = output_strides(arch, backbone)
    if output_stride not in allowed:
        raise ValueError(f"output_stride {output_stride!r} is not supported by {arch}/{backbone}; allowed: {list(allowed)}")

    model = _builder(arch, backbone, decoder)(backbone, num_classes, output_stride)
    if pretrained is not None:
        state = resolve_pretrained(pretrained, backbone)
        if backbone == "paper_resnet18":
            load_paper_backbone_imagenet(model, state)
        else:
            prefix = _SOURCE_PREFIX.get((arch, backbone), "")
            model.pretrained_fraction = copy_matching(model.backbone, state, prefix=prefix, strict=True)
    return model

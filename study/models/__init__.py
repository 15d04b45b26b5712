"""Segmentation networks of the study: ``build_model(arch, backbone, num_classes, output_stride, pretrained)``."""

from .builders import MODEL_CHOICES, build_model, output_strides
from .entries import MODELS, check_model
from .paper_resnet import load_paper_backbone_imagenet
from .pretrained import imagenet_checkpoint_path
from .wrapper import SegmentationNet

__all__ = [
    "MODEL_CHOICES",
    "MODELS",
    "check_model",
    "SegmentationNet",
    "build_model",
    "imagenet_checkpoint_path",
    "load_paper_backbone_imagenet",
    "output_strides",
]

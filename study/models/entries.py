"""Model entries: one per architecture; its settings are ``backbone``, ``output_stride``, ``pretrained``.

``check_model(model)`` refuses, when the spec loads, what ``build_model`` would refuse inside a job:
an unknown arch, a backbone the arch does not offer, an output stride the pair does not support
(e.g. 32 for DeepLabV3+), and pretrained weights that are not on disk (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

from study.components import Component, SettingError

from .builders import MODEL_CHOICES, build_model, output_strides


def _model_settings(backbone: str = "resnet18", output_stride: int = 16, pretrained: str | None = None,
                    decoder: str = "smp") -> None:
    """The settings every architecture takes."""


MODELS: dict[str, Component] = {
    arch: Component(arch, _model_settings, extra={"backbones": backbones, "build": build_model})
    for arch, backbones in MODEL_CHOICES.items()
}


def _check_pretrained(backbone: str, pretrained: str | None) -> None:
    if pretrained is None:
        return
    if pretrained == "imagenet":
        from .pretrained import imagenet_checkpoint_path

        path, url = imagenet_checkpoint_path(backbone)
        if not path.is_file():
            raise SettingError("pretrained", f"ImageNet weights for {backbone!r} not found at {str(path)!r} "
                               f"(copy {url} there; nothing is downloaded)", "null, imagenet or a weights file")
    elif not Path(pretrained).is_file():
        raise SettingError("pretrained", f"weights file {pretrained!r} does not exist",
                           "null, imagenet or a weights file")


def check_model(model) -> None:
    """Refuse an arch/backbone/output-stride/weights combination that cannot be built (SettingError)."""
    if model.arch not in MODELS:
        raise SettingError("arch", f"{model.arch!r} is not a known architecture", ", ".join(MODELS))
    backbones = MODELS[model.arch].extra["backbones"]
    if model.backbone not in backbones:
        raise SettingError("backbone", f"{model.backbone!r} is not available for arch {model.arch!r}",
                           ", ".join(backbones))
    strides = output_strides(model.arch, model.backbone)
    if model.output_stride not in strides:
        raise SettingError("output_stride", f"{model.output_stride} is not supported by {model.arch}/{model.backbone}",
                           ", ".join(map(str, strides)))
    if model.decoder != "smp" and model.arch != "deeplabv3plus":
        raise SettingError("decoder", f"{model.decoder!r} is only available for deeplabv3plus", "smp")
    _check_pretrained(model.backbone, model.pretrained)

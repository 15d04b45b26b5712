"""build_model: shapes, gradients, output stride, the paper backbone, local-only pretrained weights."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision
from torch import nn

from study.models import MODEL_CHOICES, build_model, imagenet_checkpoint_path, load_paper_backbone_imagenet, output_strides

C = 5
COMBOS = [(a, b) for a, bs in MODEL_CHOICES.items() for b in bs]
HEAVY = {"resnet101", "resnet50"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection (e.g. a weights download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch,backbone", [c for c in COMBOS if c[1] not in HEAVY])
def test_forward_shape_at_any_input_size(arch, backbone):
    torch.manual_seed(0)
    model = build_model(arch, backbone, C).eval()
    with torch.no_grad():
        for n, h, w in [(2, 32, 64), (1, 65, 97)]:
            out = model(torch.randn(n, 3, h, w))
            assert isinstance(out, torch.Tensor)
            assert out.shape == (n, C, h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch,backbone", [c for c in COMBOS if c[1] in HEAVY])
def test_heavy_backbones_construct(arch, backbone):
    model = build_model(arch, backbone, C)
    classifier = getattr(torchvision.models, backbone)()
    assert _n_params(model.backbone) == _n_params(classifier) - _n_params(classifier.fc)


@pytest.mark.slow
@pytest.mark.parametrize("arch,backbone", [c for c in COMBOS if c[1] in HEAVY])
def test_heavy_backbones_forward(arch, backbone):
    model = build_model(arch, backbone, C).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 97)).shape == (1, C, 65, 97)


@pytest.mark.parametrize(
    "arch,backbone",
    [("deeplabv3plus", "resnet18"), ("deeplabv3plus", "paper_resnet18"), ("deeplabv3plus", "mobilenet_v2"),
     ("deeplabv3", "resnet18"), ("deeplabv3", "mobilenet_v3_large"), ("lraspp", "mobilenet_v3_small"),
     ("lraspp", "mobilenet_v3_large")],
)
def test_gradient_reaches_every_parameter(arch, backbone):
    torch.manual_seed(0)
    model = build_model(arch, backbone, C).train()
    x = torch.randn(2, 3, 32, 48)
    target = torch.randint(C, (2, 32, 48))
    target[:, :5] = 255
    loss = nn.functional.cross_entropy(model(x), target, ignore_index=255)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    first = next(p for p in model.backbone.parameters() if p.dim() == 4)
    assert first.grad.abs().sum() > 0


def _feature_hw(model, x) -> tuple[int, int]:
    """Spatial size of the deepest backbone features."""
    feats = model.backbone(x)
    last = feats[-1] if isinstance(feats, list) else list(feats.values())[-1]
    return tuple(last.shape[-2:])


@pytest.mark.parametrize("arch,backbone", [c for c in COMBOS if c[1] not in HEAVY])
def test_output_stride_is_honoured(arch, backbone):
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for os_ in output_strides(arch, backbone):
            model = build_model(arch, backbone, C, output_stride=os_).eval()
            assert _feature_hw(model, x) == (32 // os_, 48 // os_)
    assert output_strides(arch, backbone) == ((16,) if "mobilenet_v3" in backbone else (8, 16))


def test_aspp_rates_follow_output_stride():
    for os_, rates in [(16, (6, 12, 18)), (8, (12, 24, 36))]:
        smp_net = build_model("deeplabv3plus", "resnet18", C, output_stride=os_).net
        got = tuple(smp_net.decoder.aspp[0].convs[i][0].dilation[0] for i in (1, 2, 3))
        assert got == rates
        assert smp_net.decoder.aspp[0].convs[0][0].kernel_size == (1, 1)  # the "rate 1" branch
        assert smp_net.decoder.block1[0].out_channels == 48  # low-level projection
        tv_net = build_model("deeplabv3", "resnet18", C, output_stride=os_).net
        aspp = tv_net.classifier[0]
        assert tuple(aspp.convs[i][0].dilation[0] for i in (1, 2, 3)) == rates


def test_deeplabv3_resnet50_os8_is_torchvisions_model():
    ours = build_model("deeplabv3", "resnet50", C, output_stride=8).net
    ref = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=C, aux_loss=False
    )
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ref_convs = {n: (m.stride, m.dilation, m.padding) for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    our_convs = {n: (m.stride, m.dilation, m.padding) for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
    assert our_convs == ref_convs
    ours.load_state_dict(ref_sd)
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["out"], ref(x)["out"])


# ----------------------------------------------------------------------------- paper backbone


def _bottleneck_params(inplanes: int, planes: int, downsample: bool) -> int:
    convs = inplanes * planes + 9 * planes * planes + planes * 4 * planes
    bns = 2 * planes + 2 * planes + 2 * 4 * planes
    ds = inplanes * 4 * planes + 2 * 4 * planes if downsample else 0
    return convs + bns + ds


def test_paper_resnet18_structure_and_parameter_count():
    model = build_model("deeplabv3plus", "paper_resnet18", C)
    bb = model.backbone
    # analytic count: stem + Bottleneck layers [2, 2, 2] + a 3-block multi-grid layer4
    expected = 3 * 64 * 49 + 2 * 64
    inplanes = 64
    for planes, blocks in [(64, 2), (128, 2), (256, 2), (512, 3)]:
        for i in range(blocks):
            expected += _bottleneck_params(inplanes, planes, downsample=(i == 0))
            inplanes = planes * 4
    assert _n_params(bb) == expected
    assert _n_params(bb) == pytest.approx(18.4e6, rel=0.005)  # the released backbone
    assert [len(bb.layer1), len(bb.layer2), len(bb.layer3), len(bb.layer4)] == [2, 2, 2, 3]
    assert all(isinstance(b, torchvision.models.resnet.Bottleneck) for b in bb.layer4)
    assert [b.conv2.dilation[0] for b in bb.layer4] == [2, 4, 8]  # multi-grid [1,2,4] x 2 at OS16
    assert [b.conv2.padding[0] for b in bb.layer4] == [2, 4, 8]
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 64))
    assert feats[-1].shape == (1, 2048, 4, 4)
    assert feats[2].shape[-2:] == (16, 16)  # stride-4 features feed the 48-channel projection
    # the whole DeepLabV3+ (backbone + ASPP + decoder) is ~34 M: 18.4 M is the backbone alone
    assert 30e6 < _n_params(model) < 38e6

    os8 = build_model("deeplabv3plus", "paper_resnet18", C, output_stride=8).backbone
    assert [b.conv2.dilation[0] for b in os8.layer4] == [4, 8, 16]
    assert [b.conv2.dilation[0] for b in os8.layer3] == [2, 2]
    assert os8.layer3[0].conv2.stride == (1, 1) and os8.layer3[0].downsample[0].stride == (1, 1)


def test_paper_backbone_takes_a_third_of_resnet18_imagenet():
    torch.manual_seed(1)
    r18 = torchvision.models.resnet18().state_dict()
    model = build_model("deeplabv3plus", "paper_resnet18", C)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    frac = load_paper_backbone_imagenet(model, r18)
    assert frac == pytest.approx(0.34, abs=0.01)  # the released backbone
    after = model.backbone.state_dict()
    copied = [k for k in after if k in r18 and r18[k].shape == after[k].shape]
    assert "conv1.weight" in copied and "layer1.0.conv2.weight" in copied and "layer4.0.conv2.weight" in copied
    for k in copied:
        assert torch.equal(after[k], r18[k])
    # BasicBlock conv1 (3x3, 64->64) cannot go into the Bottleneck's 1x1 conv1: left as initialised
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    filled = sum(after[k].numel() for k in copied) / sum(v.numel() for v in after.values())
    assert frac == pytest.approx(filled)


# ----------------------------------------------------------------------------- released DeepLabV3+ head


def _layer_signature(seq: nn.Sequential) -> list[tuple]:
    """(kind, in, out, kernel, dilation, has_bias) for convs, ("drop", p) for dropouts, kind for others."""
    sig = []
    for m in seq:
        if isinstance(m, nn.Conv2d):
            sig.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.dilation[0], m.bias is not None))
        elif isinstance(m, nn.Dropout):
            sig.append(("drop", m.p))
        else:
            sig.append(type(m).__name__)
    return sig


def test_released_network_has_the_released_parameter_count_and_dropouts():
    model = build_model("deeplabv3plus", "paper_resnet18", 16, decoder="official")
    net = model.net
    # the released network (ptsemseg DeepLab on the Bottleneck "resnet18", 16 classes)
    assert _n_params(model) == 35_251_632
    assert _n_params(model.backbone) == 18_408_768
    assert _n_params(net.aspp) == 15_535_104
    assert _n_params(net.decoder) == 1_307_760
    # today's default (smp head) stays the lighter network
    assert _n_params(build_model("deeplabv3plus", "paper_resnet18", 16)) == 34_109_792

    aspp = net.aspp
    assert [_layer_signature(b)[0] for b in aspp.branches] == [
        ("conv", 2048, 256, 1, 1, False), ("conv", 2048, 256, 3, 6, False),
        ("conv", 2048, 256, 3, 12, False), ("conv", 2048, 256, 3, 18, False)]
    assert isinstance(aspp.image_pool[0], nn.AdaptiveAvgPool2d)
    assert _layer_signature(aspp.image_pool[1:]) == [("conv", 2048, 256, 1, 1, False), "BatchNorm2d", "ReLU"]
    assert _layer_signature(aspp.project) == [("conv", 1280, 256, 1, 1, False), "BatchNorm2d", "ReLU", ("drop", 0.5)]
    dec = net.decoder
    assert _layer_signature(dec.low_level) == [("conv", 256, 48, 1, 1, False), "BatchNorm2d", "ReLU"]
    assert _layer_signature(dec.fuse) == [
        ("conv", 304, 256, 3, 1, False), "BatchNorm2d", "ReLU", ("drop", 0.5),
        ("conv", 256, 256, 3, 1, False), "BatchNorm2d", "ReLU", ("drop", 0.1),
        ("conv", 256, 16, 1, 1, True)]
    drops = [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert drops == [("net.aspp.project.3", 0.5), ("net.decoder.fuse.3", 0.5), ("net.decoder.fuse.7", 0.1)]

    os8 = build_model("deeplabv3plus", "paper_resnet18", 16, output_stride=8, decoder="official").net
    assert [b[0].dilation[0] for b in os8.aspp.branches[1:]] == [12, 24, 36]
    assert [b.conv2.dilation[0] for b in os8.encoder.layer4] == [4, 8, 16]


def _aligned_bilinear(src: torch.Tensor, out_hw, i: int, j: int) -> torch.Tensor:
    """Value at output pixel (i, j) of an align_corners=True bilinear resize of ``src`` to ``out_hw``."""
    (h_in, w_in), (h_out, w_out) = src.shape[-2:], out_hw
    i, j = i % h_out, j % w_out
    y = i * (h_in - 1) / (h_out - 1) if h_out > 1 else 0.0
    x = j * (w_in - 1) / (w_out - 1) if w_out > 1 else 0.0
    y0, x0 = min(int(y), h_in - 1), min(int(x), w_in - 1)
    y1, x1 = min(y0 + 1, h_in - 1), min(x0 + 1, w_in - 1)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * ((1 - dx) * src[..., y0, x0] + dx * src[..., y0, x1])
            + dy * ((1 - dx) * src[..., y1, x0] + dx * src[..., y1, x1]))


def test_released_head_upsamples_with_aligned_corners_at_any_input_size():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "paper_resnet18", C, decoder="official").eval()
    seen = {}
    model.net.aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("aspp", o))
    model.net.decoder.fuse.register_forward_hook(lambda m, i, o: seen.__setitem__("fuse", (i[0], o)))
    x = torch.randn(1, 3, 37, 53)  # not a multiple of the output stride: nothing is padded
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, C, 37, 53)
    fuse_in, low_logits = seen["fuse"]
    assert low_logits.shape[-2:] == (10, 14)  # stride-4 features of a 37x53 input
    # bilinear with align_corners=True: output pixel i samples the source at i * (h_in - 1) / (h_out - 1)
    for small, big in [(seen["aspp"], fuse_in[:, :256]), (low_logits, out)]:
        for i, j in [(0, 0), (1, 2), (5, 7), (big.shape[-2] - 2, big.shape[-1] - 3), (-1, -1)]:
            torch.testing.assert_close(big[..., i, j], _aligned_bilinear(small, big.shape[-2:], i, j))
    assert fuse_in.shape[1] == 304  # ASPP (256) first, then the 48 low-level channels


def test_released_head_trains_and_takes_the_paper_imagenet_subset():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "paper_resnet18", C, decoder="official").train()
    target = torch.randint(C, (2, 33, 47))
    target[:, :4] = 255
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 33, 47)), target, ignore_index=255)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.net.encoder.conv1.weight.grad.abs().sum() > 0
    frac = load_paper_backbone_imagenet(model, torchvision.models.resnet18().state_dict())
    assert frac == pytest.approx(0.34, abs=0.01)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_released_head_on_other_deeplabv3plus_backbones(backbone):
    model = build_model("deeplabv3plus", backbone, C, decoder="official").eval()
    low = model.backbone.out_channels[2]
    assert model.net.decoder.low_level[0].in_channels == low
    with torch.no_grad():
        assert model(torch.randn(1, 3, 41, 50)).shape == (1, C, 41, 50)


# ----------------------------------------------------------------------------- pretrained


@pytest.mark.parametrize(
    "arch,backbone",
    [("deeplabv3plus", "resnet18"), ("deeplabv3", "resnet18"), ("lraspp", "mobilenet_v3_small"),
     ("deeplabv3plus", "mobilenet_v2")],
)
def test_pretrained_from_local_file(tmp_path, arch, backbone):
    torch.manual_seed(2)
    state = getattr(torchvision.models, backbone)().state_dict()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    model = build_model(arch, backbone, C, pretrained=str(path)).eval()
    prefix = "features." if "mobilenet_v3" in backbone else ""
    bb = model.backbone.state_dict()
    assert len(bb) > 10
    for k, v in bb.items():
        assert torch.equal(v, state[prefix + k]), k
    assert model.pretrained_fraction == pytest.approx(1.0, abs=1e-6)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, C, 32, 32)


def test_pretrained_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ValueError, match="unexpected keys"):  # resnet34 holds resnet18's keys and more
        build_model("deeplabv3plus", "resnet18", C, pretrained=path)
    path50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path50)
    with pytest.raises(ValueError, match="shape mismatches"):
        build_model("deeplabv3plus", "resnet18", C, pretrained=path50)
    partial = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys.*layer4"):
        build_model("deeplabv3", "resnet18", C, pretrained=tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("deeplabv3plus", "resnet18", C, pretrained=tmp_path / "nope.pth")


def test_imagenet_from_torch_home_cache_and_clear_error_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_checkpoint_path("resnet18")[0] == expected
    assert imagenet_checkpoint_path("paper_resnet18")[0] == expected
    with pytest.raises(FileNotFoundError) as err:
        build_model("deeplabv3plus", "resnet18", C, pretrained="imagenet")
    assert str(expected) in str(err.value) and "Nothing is downloaded" in str(err.value)

    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    expected.parent.mkdir(parents=True)
    torch.save(state, expected)
    model = build_model("deeplabv3plus", "resnet18", C, pretrained="imagenet")
    assert torch.equal(model.backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    paper = build_model("deeplabv3plus", "paper_resnet18", C, pretrained="imagenet")
    assert paper.pretrained_fraction == pytest.approx(0.34, abs=0.01)
    assert torch.equal(paper.backbone.conv1.weight, state["conv1.weight"])


# ----------------------------------------------------------------------------- errors


def test_invalid_choices_list_valid_ones():
    with pytest.raises(ValueError, match="unknown model arch 'unet'.*deeplabv3plus"):
        build_model("unet", "resnet18", C)
    with pytest.raises(ValueError, match="backbone 'resnet18' is not available for arch 'lraspp'.*mobilenet_v3_small"):
        build_model("lraspp", "resnet18", C)
    with pytest.raises(ValueError, match="valid combinations"):
        build_model("deeplabv3plus", "vgg16", C)
    with pytest.raises(ValueError, match=r"output_stride 8 .*allowed: \[16\]"):
        build_model("lraspp", "mobilenet_v3_large", C, output_stride=8)
    with pytest.raises(ValueError, match=r"allowed: \[8, 16\]"):
        build_model("deeplabv3plus", "resnet18", C, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("deeplabv3plus", "resnet18", 0)
    with pytest.raises(ValueError, match=r"decoder: 'ptsemseg' is not allowed \(allowed: \['smp', 'official'\]\)"):
        build_model("deeplabv3plus", "resnet18", C, decoder="ptsemseg")
    with pytest.raises(ValueError, match="decoder: 'official' is not allowed for arch 'lraspp'"):
        build_model("lraspp", "mobilenet_v3_small", C, decoder="official")

"""The small ViT segmenter (any size, features, local weights only, trains) and the wrapper's
``return_features`` option on the DeepLabV3+ ResNet-18."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from study.losses.dfr import DynamicFeatureRegularizedLoss
from study.models.builders import build_model, output_strides
from study.models.vit import ViTSegmenter

torch.set_num_threads(1)


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("size", [(50, 70), (64, 128), (17, 9)])
def test_vit_any_size_gives_logits_and_token_map(patch, size):
    torch.manual_seed(0)
    net = ViTSegmenter(5, embed_dim=48, depth=2, num_heads=3, patch_size=patch).eval()
    x = torch.randn(2, 3, *size)
    logits, feats = net(x, return_features=True)
    assert logits.shape == (2, 5, *size)
    assert feats.shape == (2, 48, math.ceil(size[0] / patch), math.ceil(size[1] / patch))
    assert torch.equal(net(x), logits)


def test_vit_registered_in_build_model_with_features():
    assert output_strides("vit", "vit_tiny") == (8, 16)
    torch.manual_seed(0)
    model = build_model("vit", "vit_tiny", 4, output_stride=8).eval()
    assert model.feature_channels == 96 and model.backbone is model.net.encoder
    x = torch.randn(1, 3, 40, 72)
    logits, feats = model(x, return_features=True)
    direct_logits, direct_feats = model.net(x, return_features=True)
    assert torch.equal(logits, direct_logits) and torch.equal(feats, direct_feats)
    assert feats.shape == (1, 96, 5, 9)
    assert torch.equal(model(x), logits)
    with pytest.raises(ValueError, match="backbone"):
        build_model("vit", "vit_huge", 4)


def test_vit_features_follow_the_image_content_location():
    """A token depends on its own patch: changing one patch changes that token map cell the most."""
    torch.manual_seed(0)
    net = ViTSegmenter(3, embed_dim=48, depth=1, num_heads=3, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 48)
    y = x.clone()
    y[..., 8:16, 24:32] += 3.0  # patch (row 1, col 3)
    with torch.no_grad():
        change = (net(y, return_features=True)[1] - net(x, return_features=True)[1]).norm(dim=1)[0]
    assert divmod(int(change.argmax()), change.shape[1]) == (1, 3)


def test_deeplab_wrapper_returns_cropped_decoder_features():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "resnet18", 4, output_stride=16).eval()
    assert model.feature_channels == 256
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        padded = F.pad(x, (0, 10, 0, 14))  # to 64 x 80, multiples of the output stride
        decoder_out = model.net.decoder(model.net.encoder(padded))
    assert logits.shape == (2, 4, 50, 70)
    assert torch.equal(logits, model(x))
    assert decoder_out.shape[-2:] == (16, 20) and feats.shape == (2, 256, 13, 18)
    assert torch.equal(feats, decoder_out[..., :13, :18])


def test_networks_without_features_path_refuse_return_features():
    model = build_model("lraspp", "mobilenet_v3_small", 3)
    assert model.feature_channels is None
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(1, 3, 32, 32), return_features=True)


def test_vit_loads_weights_from_a_local_file_only(tmp_path):
    torch.manual_seed(1)
    source = build_model("vit", "vit_tiny", 4, output_stride=8)
    path = tmp_path / "vit_tiny.pt"
    torch.save(source.net.encoder.state_dict(), path)
    torch.manual_seed(2)
    loaded = build_model("vit", "vit_tiny", 4, output_stride=8, pretrained=str(path))
    assert loaded.pretrained_fraction == 1.0
    for (k, a), (_, b) in zip(source.net.encoder.state_dict().items(), loaded.net.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="vit_tiny"):
        build_model("vit", "vit_tiny", 4, pretrained="imagenet")


def test_vit_trains_on_cpu_with_the_dfr_loss():
    torch.manual_seed(0)
    model = build_model("vit", "vit_tiny", 3, output_stride=8)
    loss = DynamicFeatureRegularizedLoss(3, weight=1e-4, sigma_xy=10.0, feature_channels=model.feature_channels)
    image = torch.rand(2, 3, 32, 48) * 255
    target = torch.full((2, 32, 48), 255)
    target[:, 4:8, 4:40] = 0
    target[:, 20:24, 4:40] = 1
    target[:, 10:18, 44:46] = 2
    opt = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=3e-3)
    values = []
    for _ in range(12):
        opt.zero_grad()
        logits, feats = model((image - 128) / 64, return_features=True)
        value = loss(logits, target, image=image, features=feats)
        value.backward()
        assert model.net.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        opt.step()
        values.append(value.item())
    assert values[-1] < 0.7 * values[0]

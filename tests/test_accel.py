"""study.accel on CPU: every speed setting off (or on CPU) leaves the model and optimizer as they were;
channels_last keeps the outputs; deterministic() sets and clears torch's flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from study.accel import (configure_backends, deterministic, input_memory_format, optimizer_kwargs, prepare_model,
                         unwrap)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()


def test_channels_last_same_output_within_float_tolerance():
    x = torch.randn(2, 3, 17, 23, generator=torch.Generator().manual_seed(1))
    ref = _net()(x)
    model = prepare_model(_net(), channels_last=True, compile=False)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=input_memory_format(True)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_all_off_is_identity():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert prepare_model(net, channels_last=False, compile=False) is net
    assert unwrap(net) is net
    assert net[0].weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert input_memory_format(False) == torch.contiguous_format


def test_compile_wraps_the_same_parameters_and_unwrap_gives_plain_keys():
    net = _net()
    compiled = prepare_model(net, channels_last=False, compile=True, compile_backend="eager")
    assert compiled is not net and unwrap(compiled) is net
    assert list(unwrap(compiled).state_dict()) == list(net.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(compiled(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_kwargs_only_on_cuda(name):
    assert optimizer_kwargs(name, "cpu", fused=True) == {}
    assert optimizer_kwargs(name, torch.device("cpu"), fused=False) == {}
    assert optimizer_kwargs(name, "cuda", fused=False) == {}
    assert optimizer_kwargs(name, "cuda", fused=True) == {"fused": True}
    # the kwargs build the optimizer the trainer would build (CPU: today's implementation)
    opt = getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[name])(
        _net().parameters(), lr=0.1, **optimizer_kwargs(name, "cpu", fused=True))
    assert not opt.defaults.get("fused")


def test_fused_unknown_optimizer_is_an_error_naming_it():
    with pytest.raises(ValueError, match="rmsprop"):
        optimizer_kwargs("rmsprop", "cuda", fused=True)
    assert optimizer_kwargs("rmsprop", "cuda", fused=False) == {}


def test_configure_backends_on_cpu_changes_nothing():
    state = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    assert configure_backends("cpu", tf32=True, cudnn_benchmark=True) == {}
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == state


def test_deterministic_sets_and_clears_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.deterministic = False

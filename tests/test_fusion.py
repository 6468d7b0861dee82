"""ReLU + max pool fused: the same values and gradients, less kept for the backward pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from core.engine import backbones
from core.engine import device as engine_device
from core.engine.cpu import fusion
from core.settings import Settings
from tests.conftest import losses_off_and_on


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 7, 9), (1, 4, 2, 2)])
def test_same_output_and_gradient_as_relu_then_pool(shape, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[..., 0, :2] = 0.0  # ties at zero, where the two orders pick different positions
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = nn.MaxPool2d(2, 2)(nn.ReLU()(x1))
    y2 = fusion.ReluMaxPool()(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    assert x2.grad.is_contiguous(memory_format=torch.channels_last) == channels_last or (
        x2.grad.is_contiguous()
    )


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for the backward pass of one forward (distinct
    storages, weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_fusing_vgg19_keeps_less_for_the_backward_pass_and_changes_nothing() -> None:
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    plain = backbones.build("vgg19", None, layers)
    fused = backbones.build("vgg19", None, layers)
    fused.load_state_dict(plain.state_dict())
    assert fusion.fuse_relu_pool(fused.features, keep=set(fused.index.values())) == 4
    x = torch.rand(1, 3, 64, 48, requires_grad=True)
    before, after = _saved_bytes(plain, x), _saved_bytes(fused, x)
    # relu1_2, relu2_2, relu3_4 and relu4_4 and the int64 pool indices of each were kept; now
    # one byte per pooled output (0.55x in all; 0.71x with int64 indices and a mask).
    assert after < 0.6 * before
    out1, out2 = plain(x), fused(x)
    for name in layers:
        torch.testing.assert_close(out2[name], out1[name], rtol=0, atol=0)
    g1 = torch.autograd.grad(sum(v.square().sum() for v in out1.values()), x)[0]
    g2 = torch.autograd.grad(sum(v.square().sum() for v in out2.values()), x)[0]
    torch.testing.assert_close(g2, g1)


def test_a_relu_that_is_asked_for_is_not_fused() -> None:
    model = backbones.build("vgg19", None, ["relu1_2", "relu3_1"])
    assert fusion.fuse_relu_pool(model.features, keep=set(model.index.values())) == 1
    assert isinstance(model.features[3], nn.ReLU)  # relu1_2 is returned, so it stays
    assert isinstance(model.features[9], fusion.ReluMaxPool)  # relu2_2 + pool2
    out = model(torch.rand(1, 3, 32, 32))
    assert (out["relu1_2"] >= 0).all() and out["relu1_2"].shape[-1] == 32


def test_only_plain_2x2_pools_after_a_relu_are_fused() -> None:
    seq = nn.Sequential(
        nn.ReLU(), nn.MaxPool2d(3, 2), nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(1, 1, 1), nn.MaxPool2d(2, 2), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    assert fusion.fuse_relu_pool(seq) == 1
    assert isinstance(seq[6], nn.Identity) and isinstance(seq[7], fusion.ReluMaxPool)


def test_engine_uses_it_on_the_cpu_with_the_same_objective(
    tiny_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.engine import autotune

    # The speed probe (first use in the session) builds fused networks of its own: let it run
    # before counting, so the test holds when it runs alone.
    autotune.choose("auto", None, torch.device("cpu"))
    calls = {"n": 0}
    original = fusion._ReluMaxPool.forward

    def counted(ctx, x):
        calls["n"] += 1
        return original(ctx, x)

    monkeypatch.setattr(fusion._ReluMaxPool, "forward", staticmethod(counted))

    def unused() -> None:
        assert calls["n"] == 0

    results = losses_off_and_on(tiny_settings, "fused_pooling", 2, after_off=unused)
    assert calls["n"] > 0
    for term, value in results[False].items():
        assert results[True][term] == pytest.approx(value, rel=1e-5)
    assert engine_device.pick_fused_pooling(Settings(), torch.device("cpu"))
    assert not engine_device.pick_fused_pooling(Settings(), torch.device("meta"))

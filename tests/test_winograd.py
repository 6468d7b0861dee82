"""Winograd F(4x4, 3x3) convolutions: the same results and input gradients as ``conv2d``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from core.engine import backbones
from core.engine import device as engine_device
from core.engine.cpu import winograd
from core.settings import Settings
from tests.conftest import losses_off_and_on


def _pair(c: int, k: int, seed: int = 0) -> tuple[nn.Conv2d, winograd.WinogradConv2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, padding=1).requires_grad_(False)
    return conv, winograd.WinogradConv2d(conv)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape", [(2, 5, 7, 13, 9), (1, 16, 8, 4, 4), (1, 3, 4, 1, 1), (1, 8, 8, 6, 10)]
)
def test_forward_and_input_gradient_match_conv2d(shape, channels_last: bool) -> None:
    n, c, k, h, w = shape
    conv, fast = _pair(c, k)
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conv(x1), fast(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert y2.shape == y1.shape
    assert y2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)


def test_bands_of_tile_rows_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    conv, fast = _pair(8, 6)
    x = torch.randn(1, 8, 17, 22, requires_grad=True)
    whole = fast(x)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(winograd, "BAND_ELEMENTS", 36 * 6 * 8)  # one tile row per band
    banded = fast(x)
    (g_banded,) = torch.autograd.grad(banded.square().sum(), x)
    torch.testing.assert_close(banded, whole)
    torch.testing.assert_close(g_banded, g_whole)
    torch.testing.assert_close(banded, conv(x), rtol=1e-4, atol=1e-4)


def test_output_can_be_modified_in_place_by_relu() -> None:
    _, fast = _pair(4, 4)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = nn.ReLU(inplace=True)(fast(x))  # a view output would make autograd refuse this
    y.sum().backward()
    assert x.grad is not None


def test_runs_in_bf16_under_autocast_and_falls_back_for_trainable_weights() -> None:
    conv, fast = _pair(32, 32)
    x = torch.randn(1, 32, 16, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
        assert y.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    # bf16 keeps 8 significant bits (rounding error 2^-9 = 0.2 %); F(4x4, 3x3)'s transforms
    # amplify it about tenfold (2.7 % per layer measured, docs/BENCHMARKS.md), hence 6 %.
    ref = conv(x.detach())
    assert float((y.detach().float() - ref).norm() / ref.norm()) < 0.06
    conv.requires_grad_(True)
    y = fast(x.detach())
    y.sum().backward()
    assert conv.weight.grad is not None  # only the plain conv computes weight gradients


def test_supports_only_3x3_stride_1_padding_1() -> None:
    assert winograd.supports(nn.Conv2d(4, 4, 3, padding=1))
    assert not winograd.supports(nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not winograd.supports(nn.Conv2d(4, 4, 1))
    assert not winograd.supports(nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"))
    with pytest.raises(ValueError):
        winograd.WinogradConv2d(nn.Conv2d(4, 4, 5, padding=2))


def test_convert_swaps_the_wide_vgg19_layers_only() -> None:
    model = backbones.build("vgg19", None, ["relu5_1"])
    swapped = winograd.convert(model.features)
    kinds = {
        backbones.VGG19.names[i]: type(m).__name__
        for i, m in enumerate(model.features)
        if isinstance(m, (nn.Conv2d, winograd.WinogradConv2d))
    }
    assert kinds["conv1_1"] == kinds["conv1_2"] == "Conv2d"
    wide = ("conv2_1", "conv2_2", "conv3_1", "conv4_4", "conv5_1")
    assert {kinds[n] for n in wide} == {"WinogradConv2d"}
    assert swapped == 11
    assert winograd.convert(model.features) == 0  # idempotent


def test_converted_model_keeps_its_weights_and_its_size() -> None:
    # The transformed filters (4x the weights) are made per call, never kept.
    model = backbones.build("vgg19", None, ["relu5_1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    winograd.convert(model.features)
    model(torch.rand(1, 3, 32, 32))
    after = {k.replace(".conv.", "."): v for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    stored = sum(v.untyped_storage().nbytes() for v in after.values())
    assert stored == sum(v.untyped_storage().nbytes() for v in before.values())
    kept = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert kept == []


def test_engine_objective_is_the_same_with_and_without_winograd(
    tiny_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One step from the same start: the loss terms agree to fp32 rounding.
    calls = {"forward": 0, "adjoint": 0}

    def counting(fn: Callable, key: str) -> Callable:
        def counted(*args):
            calls[key] += 1
            return fn(*args)

        return counted

    monkeypatch.setattr(winograd, "conv3x3", counting(winograd.conv3x3, "forward"))
    monkeypatch.setattr(winograd, "conv3x3_adjoint", counting(winograd.conv3x3_adjoint, "adjoint"))

    def unused() -> None:
        assert calls == {"forward": 0, "adjoint": 0}

    results = losses_off_and_on(tiny_settings, "winograd", 1, after_off=unused)
    assert calls["forward"] > 0 and calls["adjoint"] > 0  # the engine really used it
    for term, value in results[False].items():
        assert results[True][term] == pytest.approx(value, rel=1e-4)


def test_winograd_is_offered_on_cpus_only_and_forced_settings_hold() -> None:
    from core.engine import autotune

    assert any(p.winograd for p in autotune.paths_for("cpu"))
    assert not any(p.winograd for p in autotune.paths_for("cuda"))  # cuDNN has its own
    cpu = torch.device("cpu")
    assert engine_device.pick_winograd(Settings(precision="fp32", winograd=True), cpu)
    assert not engine_device.pick_winograd(Settings(precision="bf16", winograd=False), cpu)


def test_winograd_setting_is_validated() -> None:
    from core.errors import SettingsError

    with pytest.raises(SettingsError, match="winograd"):
        Settings(winograd="yes")  # type: ignore[arg-type]

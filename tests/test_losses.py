"""Loss formulas against hand-computed values, and the normalisations that make defaults hold
at any image size."""

from __future__ import annotations

import pytest
import torch

from core.engine.colour import match_colour_stats, rgb_to_ycbcr, ycbcr_to_rgb
from core.engine.losses import (
    ContentLoss,
    GramGuide,
    LayerApply,
    MaskedContentLoss,
    Scale,
    StyleLoss,
    StyleShift,
    SumLoss,
    TVLoss,
    gram,
    guided_gram,
    scaled_mse,
)


def test_gram_matches_hand_computed_values_divided_by_positions() -> None:
    # Two channels over 2x1 positions: a = (1, 2), b = (3, 4).
    x = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    expected = torch.tensor([[[1 + 4, 3 + 8], [3 + 8, 9 + 16]]]) / 2
    assert torch.allclose(gram(x), expected)


def test_gram_is_independent_of_image_size() -> None:
    x = torch.rand(1, 8, 5, 7)
    tiled = x.repeat(1, 1, 3, 2)  # same statistics, six times the positions
    assert torch.allclose(gram(x), gram(tiled), atol=1e-6)


def test_gram_of_bf16_features_is_float32() -> None:
    assert gram(torch.rand(1, 4, 3, 3).bfloat16()).dtype == torch.float32


def test_scaled_mse_is_sum_of_squares_over_sum_of_abs() -> None:
    a = torch.tensor([1.0, 2.0, 4.0])
    b = torch.tensor([1.0, 0.0, 1.0])  # differences 0, 2, 3
    assert scaled_mse(a, b).item() == pytest.approx((4 + 9) / (2 + 3))


def test_scaled_mse_gradient_has_l1_norm_about_one() -> None:
    a = (torch.rand(1000) * 10).requires_grad_(True)
    scaled_mse(a, torch.zeros(1000)).backward()
    assert a.grad.abs().sum().item() == pytest.approx(1.0, rel=0.35)


def test_content_loss_is_size_independent() -> None:
    x, y = torch.rand(1, 4, 6, 6), torch.rand(1, 4, 6, 6)
    small = ContentLoss(y)(x)
    big = ContentLoss(y.repeat(1, 1, 2, 2))(x.repeat(1, 1, 2, 2))
    assert small.item() == pytest.approx(big.item(), rel=1e-5)


def test_style_loss_is_zero_for_its_own_target_and_positive_otherwise() -> None:
    x = torch.rand(1, 4, 6, 6)
    assert StyleLoss(gram(x))(x).item() == pytest.approx(0.0, abs=1e-6)
    assert StyleLoss(gram(x))(torch.rand(1, 4, 6, 6)).item() > 0


def test_tv_loss_hand_computed_on_a_2x2_image() -> None:
    # One channel [[0, 1], [0, 1]], replicate-padded to rows of [0, 0, 1, 1].
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    d1 = (1 / 2) / 3  # horizontal differences over the 2x2 interior: (1, 0) per row
    d2 = 0.0  # vertical: all rows equal
    d3 = (1 / 3) / 12  # diagonal over the 3x3 window: (0, 1, 0) per row
    d4 = (1 / 3) / 12  # anti-diagonal: (0, -1, 0) per row
    assert TVLoss()(x).item() == pytest.approx(2 * (d1 + d2 + d3 + d4))


def test_tv_loss_of_flat_image_is_zero_and_is_a_mean() -> None:
    assert TVLoss()(torch.full((1, 3, 5, 5), 0.3)).item() == 0.0
    x = torch.rand(1, 3, 8, 8)
    assert TVLoss()(x.repeat(1, 1, 1, 1)).item() == pytest.approx(TVLoss()(x).item())


def test_composed_objective_sums_scaled_terms_and_reports_each() -> None:
    feats = {"a": torch.rand(1, 2, 3, 3), "input": torch.rand(1, 3, 4, 4)}
    target = torch.rand(1, 2, 3, 3)
    content = Scale(LayerApply(ContentLoss(target), "a"), 2.0)
    tv = Scale(LayerApply(TVLoss(), "input"), 0.5)
    objective = SumLoss({"content": [content], "tv": [tv]})
    total = objective(feats)
    values = objective.values()
    expected_c = 2.0 * scaled_mse(feats["a"], target).item()
    expected_tv = 0.5 * TVLoss()(feats["input"]).item()
    assert values["content"] == pytest.approx(expected_c, rel=1e-5)
    assert values["tv"] == pytest.approx(expected_tv, rel=1e-5)
    assert total.item() == pytest.approx(expected_c + expected_tv, rel=1e-5)


def test_ycbcr_round_trip() -> None:
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=1e-5)


def test_colour_stats_matching_gives_the_content_mean_and_covariance() -> None:
    gen = torch.Generator().manual_seed(0)
    style = torch.rand(1, 3, 16, 16, generator=gen) * 0.3 + 0.1
    content = torch.rand(1, 3, 16, 16, generator=gen) * 0.4 + 0.4
    out = match_colour_stats(style, content)
    o, c = out[0].reshape(3, -1), content[0].reshape(3, -1)
    assert torch.allclose(o.mean(1), c.mean(1), atol=1e-3)
    assert torch.allclose(torch.cov(o), torch.cov(c), atol=2e-3)


def test_gram_of_channels_last_features_equals_contiguous() -> None:
    x = torch.rand(2, 5, 6, 7)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gram(cl), gram(x))
    a, b = x.clone().requires_grad_(), cl.clone().requires_grad_()
    gram(a).square().sum().backward()
    gram(b).square().sum().backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gram_gradient_matches_autograd_of_the_plain_product(channels_last: bool) -> None:
    x = torch.rand(2, 5, 6, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.rand(2, 5, 5, dtype=torch.float64)  # not symmetric: both halves must count
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (gram(a) * weights).sum().backward()
    mat = b.reshape(2, 5, 42)
    (torch.bmm(mat, mat.transpose(1, 2)) / 42 * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gram_of_bf16_features_is_exact_and_keeps_only_the_bf16_activation(
    channels_last: bool,
) -> None:
    """Autocast gives bf16 activations: the Gram is taken in float32 (exactly that of the same
    values), the backward gets by with the bf16 activation (no float32 copy kept) and returns
    the float32 gradient to bf16 precision."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 12).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(1, 8, 8)  # not symmetric
    a, b = x.clone().requires_grad_(), x.float().requires_grad_()
    ga, gb = gram(a), gram(b)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    assert [t.dtype for t in ga.grad_fn.saved_tensors] == [torch.bfloat16]
    (ga * weights).sum().backward()
    (gb * weights).sum().backward()
    assert a.grad is not None and b.grad is not None and a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=2e-2, atol=1e-3)


def test_style_loss_takes_an_activation_or_its_gram() -> None:
    x, target = torch.rand(1, 4, 6, 6), gram(torch.rand(1, 4, 6, 6))
    assert StyleLoss(target)(gram(x)).item() == pytest.approx(StyleLoss(target)(x).item())


def test_a_style_shift_targets_its_first_inputs_gram_moved_by_the_shift() -> None:
    x0, later = torch.rand(1, 4, 6, 6), torch.rand(1, 4, 6, 6)
    shift = torch.rand(1, 4, 4) * 0.1
    term = StyleShift(shift)
    assert term.start is None
    first = term(x0)
    torch.testing.assert_close(term.start, gram(x0))
    assert first.item() == pytest.approx(StyleLoss(gram(x0) + shift)(x0).item())
    # Later inputs are measured against the same target, not against their own Gram.
    assert term(later).item() == pytest.approx(StyleLoss(gram(x0) + shift)(later).item())
    torch.testing.assert_close(term.start, gram(x0))
    assert StyleShift(torch.zeros(1, 4, 4))(gram(x0)).item() == pytest.approx(0.0, abs=1e-6)


# ---- spatial guidance (keep_faces) ----------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_guided_gram_and_its_gradient_match_the_weighted_product(channels_last: bool) -> None:
    x = torch.rand(2, 5, 6, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(1, 1, 6, 7, dtype=torch.float64)
    outer = torch.rand(2, 5, 5, dtype=torch.float64)  # not symmetric: both halves must count
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (guided_gram(a, w) * outer).sum().backward()
    mat, wf = b.reshape(2, 5, 42), w.reshape(1, 1, 42)
    reference = torch.bmm(mat * wf, mat.transpose(1, 2)) / wf.sum()
    (reference * outer).sum().backward()
    torch.testing.assert_close(guided_gram(x, w), reference.detach().float())
    torch.testing.assert_close(a.grad, b.grad)


def test_guided_gram_with_equal_weights_is_the_gram() -> None:
    x = torch.rand(1, 4, 8, 8)
    torch.testing.assert_close(guided_gram(x, torch.full((1, 1, 8, 8), 0.3)), gram(x))


def test_gram_guide_resamples_its_weights_to_each_layer() -> None:
    weights = torch.ones(1, 1, 16, 16)
    weights[..., :8, :] = 0.0  # the top half does not count
    guide = GramGuide(weights)
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(guide.gram(x), gram(x[..., 2:, :]))  # area-resampled to 4x4


def test_masked_content_loss_sees_only_its_region_at_any_resolution() -> None:
    target = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1.0  # the right half of the image
    loss = MaskedContentLoss(target, mask)
    assert loss.coverage == pytest.approx(0.5)
    outside = target.clone()
    outside[..., :, :2] = 5.0  # a large error on the left only
    assert float(loss(outside)) == 0.0
    inside = target.clone()
    inside[..., :, 2:] = 1.0
    assert float(loss(inside)) == pytest.approx(float(scaled_mse(inside[..., 2:], target[..., 2:])))

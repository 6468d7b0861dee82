"""End to end through the real engine with a random-weight VGG19 checkpoint on tiny images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import Cancelled, ImageError, SettingsError, WeightsError, stylize
from core.engine import backbones, scale
from core.engine.backbones import random_state_dict
from core.engine.colour import Preservation, match_colour_stats, rgb_to_ycbcr
from core.engine.losses import gram, gram_key
from core.engine.model import Forward, layer_plan
from core.engine.run import Engine, pyramid
from core.engine.tensors import to_image, to_tensor
from core.settings import Settings
from tests.conftest import image_bytes, make_image


def test_objective_falls_substantially_and_output_has_the_requested_size(tiny_settings) -> None:
    events = []
    result = stylize(
        make_image(64, 48, seed=1),
        [make_image(64, 64, seed=2)],
        tiny_settings(iterations=30, pyramid=False),
        on_progress=events.append,
    )
    assert len(events) == 30
    assert events[-1].losses["total"] < 0.7 * events[0].losses["total"]
    assert result.image.size == (64, 48)
    assert result.image.mode == "RGB"
    assert result.metadata["random_weights"] is False
    pyramid_run = stylize(
        make_image(64, 48, seed=1), [make_image(64, 64, seed=2)], tiny_settings(iterations=1)
    )
    assert pyramid_run.metadata["scales"] == [[32, 24], [45, 34], [64, 48]]
    assert pyramid_run.metadata["steps"] == [2, 1, 1]


def test_progress_events_arrive_in_order(tiny_settings) -> None:
    events = []
    stylize(
        make_image(64, 48),
        [make_image(64, 64, seed=2)],
        tiny_settings(iterations=4, preview_every=3),
        on_progress=events.append,
    )
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert events[-1].step == events[-1].total_steps == 8 + 4 + 4
    assert [e.scale for e in events] == sorted(e.scale for e in events)
    assert all(0 < e.percent <= 100 for e in events)
    assert events[-1].percent == 100
    assert all(e.eta is not None and e.eta >= 0 for e in events[1:])
    previews = [e for e in events if e.preview is not None]
    assert [e.step for e in previews] == [3, 6, 9, 12, 15]
    assert max(previews[0].preview.size) <= 256


def test_same_seed_same_result_on_cpu(tiny_settings) -> None:
    s = tiny_settings(init="noise", seed=7, iterations=3)
    a = stylize(make_image(), [make_image(seed=3)], s).image.tobytes()
    b = stylize(make_image(), [make_image(seed=3)], s).image.tobytes()
    c = stylize(make_image(), [make_image(seed=3)], s.replace(seed=8)).image.tobytes()
    assert a == b
    assert a != c


def test_cancellation_stops_within_one_step(tiny_settings) -> None:
    events = []
    with pytest.raises(Cancelled):
        stylize(
            make_image(),
            [make_image(seed=3)],
            tiny_settings(iterations=50),
            on_progress=events.append,
            should_stop=lambda: len(events) >= 3,
        )
    assert len(events) == 3


def test_alpha_is_kept_and_put_back(tiny_settings) -> None:
    content = make_image(64, 48, mode="RGBA")
    result = stylize(content, [make_image(seed=3)], tiny_settings(iterations=2))
    assert result.image.mode == "RGBA"
    assert result.image.getchannel("A").tobytes() == content.getchannel("A").tobytes()


def test_inputs_from_path_bytes_and_pil(tmp_path: Path, tiny_settings) -> None:
    path = tmp_path / "c.jpg"
    path.write_bytes(image_bytes("JPEG", width=80, height=40))
    result = stylize(str(path), [(image_bytes(seed=4), 1.0)], tiny_settings(size=48, iterations=2))
    assert result.image.size == (48, 24)


@pytest.mark.parametrize("blend", ["gram", "loss"])
def test_two_styles_with_blend_weights(tiny_settings, blend: str) -> None:
    s = tiny_settings(style_blend=blend, iterations=3)
    red = Image.new("RGB", (48, 48), (220, 30, 30))
    red.paste(make_image(24, 24, seed=9), (0, 0))
    one = stylize(make_image(), [(red, 3.0), (make_image(seed=5), 1.0)], s).image
    other = stylize(make_image(), [(red, 1.0), (make_image(seed=5), 3.0)], s).image
    assert one.tobytes() != other.tobytes()


def test_strength_moves_the_balance_towards_style(tiny_settings) -> None:
    def content_loss(strength: float) -> float:
        events = []
        stylize(
            make_image(),
            [make_image(seed=5)],
            tiny_settings(strength=strength, iterations=3),
            on_progress=events.append,
        )
        return events[-1].losses["content"]

    assert Settings(strength=0.0).effective_content_weight == pytest.approx(0.15)
    assert Settings(strength=1.0).effective_content_weight == pytest.approx(0.0015)
    assert content_loss(1.0) < content_loss(0.0)


def test_luminance_mode_keeps_the_photo_colours(tiny_settings) -> None:
    content = make_image(64, 48, seed=1)
    result = stylize(
        content,
        [make_image(seed=6)],
        tiny_settings(preserve_colors="luminance", iterations=3, pyramid=False),
    )
    out = rgb_to_ycbcr(to_tensor(result.image, torch.device("cpu")))
    ref = rgb_to_ycbcr(to_tensor(content, torch.device("cpu")))
    chroma_error = (out[:, 1:] - ref[:, 1:]).abs().mean().item()
    luma_change = (out[:, :1] - ref[:, :1]).abs().mean().item()
    assert chroma_error < 0.02  # 8-bit rounding and clamping only
    assert luma_change > chroma_error


def _tinted(rgb: tuple[float, float, float], seed: int) -> Image.Image:
    """A textured test image pulled toward one colour."""
    t = to_tensor(make_image(seed=seed), torch.device("cpu"))
    return to_image(t * 0.4 + torch.tensor(rgb).view(1, 3, 1, 1) * 0.6)


def _mean_rgb(img: Image.Image) -> torch.Tensor:
    return to_tensor(img, torch.device("cpu")).mean(dim=(0, 2, 3))


def test_stats_mode_takes_the_style_targets_from_the_style_recoloured_toward_the_photo(
    tiny_settings,
) -> None:
    photo, style = _tinted((0.9, 0.2, 0.1), seed=1), _tinted((0.1, 0.3, 0.9), seed=3)
    s = tiny_settings(preserve_colors="stats", iterations=1, pyramid=False)
    eng = Engine()
    eng.stylize(photo, [style], s)
    (grams,) = eng.targets.values()
    (model,) = eng.models.values()
    cpu = torch.device("cpu")
    recoloured = to_image(match_colour_stats(to_tensor(style, cpu), to_tensor(photo, cpu)))
    # The recoloured style has the photo's colours (its mean within 2 of 255 levels per channel).
    assert torch.allclose(_mean_rgb(recoloured), _mean_rgb(photo), atol=2 / 255)
    assert not torch.allclose(_mean_rgb(style), _mean_rgb(photo), atol=0.2)
    fwd = Forward(model, cpu, None, channels_last=True)
    plan = layer_plan(s)

    def targets(img: Image.Image) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = fwd(to_tensor(img, cpu), plan.style)
        return {n: gram(feats[n]) for n in plan.style}

    # The same forward pass as the engine's on the same pixels: equal up to float rounding.
    want, raw = targets(recoloured), targets(style)
    for n in plan.style:
        torch.testing.assert_close(grams[n], want[n], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(grams[n], raw[n], rtol=0.05)


def test_each_init_starts_from_what_it_says(tiny_settings, tmp_path: Path) -> None:
    """With no steps the output is the start image itself (at the output size)."""
    content, init_img = make_image(seed=1), make_image(30, 20, seed=11)
    init_img.save(init := tmp_path / "init.png")
    start = {
        kind: stylize(
            content,
            [make_image(seed=3)],
            tiny_settings(init=kind, init_image=path, iterations=0, pyramid=False),
        ).image
        for kind, path in (("content", None), ("noise", None), ("image", str(init)))
    }
    cpu = torch.device("cpu")
    noise = torch.rand((1, 3, 48, 64), generator=torch.Generator().manual_seed(Settings().seed))
    expected = {
        "content": to_tensor(content, cpu),
        "noise": to_tensor(to_image(noise), cpu),
        "image": to_tensor(init_img.resize((64, 48), Image.Resampling.LANCZOS), cpu),
    }
    for init, img in start.items():
        got = to_tensor(img, cpu)
        # One 8-bit level: the start only goes through float and back to 8 bits.
        torch.testing.assert_close(got, expected[init], rtol=0, atol=1 / 255 + 1e-6)
        for other in set(expected) - {init}:
            assert (got - expected[other]).abs().mean() > 0.05


def test_adam_optimises_from_the_content(tiny_settings) -> None:
    content, events = make_image(seed=1), []
    s = tiny_settings(optimizer="adam", iterations=8, pyramid=False, learning_rate=0.01)
    r = stylize(content, [make_image(seed=3)], s, on_progress=events.append)
    assert events[-1].losses["total"] < 0.9 * events[0].losses["total"]
    moved = to_tensor(r.image, torch.device("cpu")) - to_tensor(content, torch.device("cpu"))
    # The output is the iterates' slow average (decay 0.99) from the content: near it, not equal.
    assert moved.abs().max() > 0 and moved.abs().mean() < 0.02


def test_style_targets_are_cached_between_runs(tiny_settings) -> None:
    style = make_image(64, 64, seed=21)
    s = tiny_settings(iterations=1)
    stylize(make_image(), [style], s)
    again = stylize(make_image(seed=2), [style], s)
    assert again.metadata["style_cache_hits"] == len(again.metadata["scales"])


def test_early_stop_ends_a_scale_when_the_loss_stalls(tiny_settings) -> None:
    events = []
    # A content-only objective from the content itself is already at its minimum.
    s = tiny_settings(
        iterations=40, style_weight=0.0, tv_weight=0.0, early_stop=0.01, patience=3, pyramid=False
    )
    stylize(make_image(), [make_image(seed=3)], s, on_progress=events.append)
    assert len(events) < 40
    assert events[-1].step == events[-1].total_steps


def test_random_backbone_is_marked_in_the_metadata() -> None:
    s = Settings(backbone="random", size=32, min_size=32, iterations=1, device="cpu")
    result = stylize(make_image(32, 32), [make_image(seed=3)], s)
    assert result.metadata["random_weights"] is True
    assert result.metadata["weights"] == "random"


def test_squeezenet_and_caffe_checkpoints_load_through_the_same_path(
    tmp_path: Path, vgg19_checkpoint
) -> None:
    squeeze = tmp_path / "squeezenet1_1-random.pth"
    torch.save(random_state_dict("squeezenet", seed=3), squeeze)
    s = Settings(
        backbone="squeezenet",
        weights=str(squeeze),
        size=64,
        min_size=48,
        iterations=2,
        device="cpu",
    )
    assert stylize(make_image(), [make_image(seed=3)], s).image.size == (64, 48)
    caffe = s.replace(backbone="vgg19-caffe", weights=str(vgg19_checkpoint))
    assert stylize(make_image(), [make_image(seed=3)], caffe).metadata["backbone"] == "vgg19-caffe"


def test_a_checkpoint_of_the_wrong_network_fails_clearly(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save(random_state_dict("squeezenet"), wrong)
    s = Settings(
        backbone="vgg19", weights=str(wrong), size=32, min_size=32, iterations=1, device="cpu"
    )
    with pytest.raises(WeightsError, match="not a vgg19 checkpoint"):
        stylize(make_image(), [make_image(seed=3)], s)


def test_missing_weights_never_fall_back_to_random(tmp_path: Path) -> None:
    s = Settings(backbone="vgg19", weights=str(tmp_path / "nope.pth"), size=32, device="cpu")
    with pytest.raises(WeightsError):
        stylize(make_image(), [make_image(seed=3)], s)


@pytest.mark.parametrize("data", [b"", b"not an image", image_bytes()[:200]])
def test_bad_images_raise_image_error(tiny_settings, data: bytes) -> None:
    with pytest.raises(ImageError):
        stylize(data, [make_image()], tiny_settings())
    with pytest.raises(ImageError):
        stylize(make_image(), [data], tiny_settings())


def test_an_image_too_thin_for_the_network_is_refused(tiny_settings) -> None:
    """Only when even the largest painting could not give it a 16 px short side (thinner
    panoramas are painted larger: tests/test_keep_faces.py)."""
    with pytest.raises(ImageError, match="too thin"):
        stylize(make_image(9000, 16), [make_image()], tiny_settings(size=64))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": 5}, "size must be between"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"strength": 1.5}, "strength must be between"),
        ({"init": "image"}, "needs init_image"),
        ({"style_layer_weights": (1.0,)}, "one weight per style layer"),
        ({"content_weight": float("nan")}, "finite"),
    ],
)
def test_bad_settings_raise_settings_error(changes: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(
            **{"style_layers": ("relu1_1", "relu2_1")} if "style_layer_weights" in changes else {},
            **changes,
        )


def test_unknown_layers_and_empty_styles_are_settings_errors(tiny_settings) -> None:
    with pytest.raises(SettingsError, match="no layer"):
        stylize(make_image(), [make_image()], tiny_settings(content_layers=("relu9_9",)))
    with pytest.raises(SettingsError, match="at least one style"):
        stylize(make_image(), [], tiny_settings())
    with pytest.raises(SettingsError, match="positive"):
        stylize(make_image(), [(make_image(), -1.0)], tiny_settings())


def test_settings_round_trip_through_dicts_and_reject_unknown_keys() -> None:
    s = Settings(style_layers=("relu1_1", "relu2_1"), strength=0.7)
    assert Settings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="Unknown setting"):
        Settings.from_dict({"sizee": 3})


def test_pyramid_scales_grow_by_sqrt2_up_to_the_size() -> None:
    assert pyramid(128, 512, True) == [128, 181, 256, 362, 512]
    assert pyramid(128, 512, False) == [512]
    assert pyramid(600, 512, True) == [512]


def test_scales_above_full_steps_up_to_get_steps_in_proportion_to_one_over_their_side() -> None:
    """neural-style's high-resolution recipe (500 iterations at 512 px ... 50 at 3620), from
    1024 px on; below it, and with the fall-off off, every later scale gets ``iterations``."""
    from core.engine.run import plan_scales

    def steps(**kw: object) -> list[tuple[int, int]]:
        return [(max(p.size), p.iterations) for p in plan_scales(Settings(**kw), (4000, 3000), 32)]

    assert steps(size=4096)[-5:] == [(1024, 20), (1448, 14), (2048, 10), (2896, 7), (4096, 5)]
    assert steps(size=4096)[0] == (128, 40)  # the first scale keeps its own budget
    assert all(n == 20 for _, n in steps(size=1024)[1:])
    assert all(n == 20 for _, n in steps(size=4096, full_steps_up_to=0)[1:])
    assert steps(size=4096, iterations=100)[-1] == (4096, 25)
    assert steps(size=4096, iterations=1)[-1] == (4096, 1)  # never below one step
    assert steps(size=2048, iterations=0)[-1] == (2048, 0)
    assert steps(size=2048, pyramid=False) == [(2048, 20)]  # one scale: all of its budget
    with pytest.raises(SettingsError, match="full_steps_up_to"):
        Settings(full_steps_up_to=-1)


def test_png_output_records_settings(tiny_settings, tmp_path: Path) -> None:
    from core.images import read_metadata, save_image

    result = stylize(make_image(), [make_image(seed=3)], tiny_settings(iterations=1))
    out = tmp_path / "out.png"
    save_image(result.image, out, metadata=result.metadata)
    meta = read_metadata(out)
    assert meta["settings"]["size"] == 64
    assert Image.open(io.BytesIO(out.read_bytes())).size == (64, 48)


def test_lbfgs_scale_ends_on_its_best_image_after_going_uphill(
    tiny_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step size far too large makes L-BFGS overshoot; the scale must not end on the worse image.
    def overshooting(s, image, first_scale=None):
        return torch.optim.LBFGS([image], lr=50.0, max_iter=1, history_size=10), None

    monkeypatch.setattr(scale, "make_optimizer", overshooting)
    seen: list[float] = []
    r = stylize(
        make_image(64, 48),
        [make_image(64, 48, seed=3)],
        tiny_settings(pyramid=False, iterations=6, initial_iterations=6),
        on_progress=lambda p: seen.append(p.losses["total"]),
    )
    assert max(seen) > seen[0]  # it really went uphill
    assert r.metadata["restored_best"] == [1]
    assert r.metadata["losses"]["total"] == pytest.approx(min(seen))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_grams_are_taken_during_the_forward_pass_and_differentiated_just_in_time(dtype) -> None:
    """The shallow Gram's backward must wait until the backward pass reaches its layer (it
    would otherwise hold a full-resolution gradient through the whole pass)."""
    model = backbones.build("vgg19", None, ["relu1_1", "relu2_1"])
    fwd = Forward(model, torch.device("cpu"), dtype, channels_last=True)
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    feats = fwd(x, grams=["relu1_1", "relu2_1"])
    for name in ("relu1_1", "relu2_1"):
        g = feats[gram_key(name)]
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, gram(feats[name].float()))
    order: list[str] = []
    for key in (gram_key("relu1_1"), gram_key("relu2_1"), "relu2_1"):
        feats[key].grad_fn.register_hook(lambda *_, key=key: order.append(key))
    (feats[gram_key("relu1_1")].sum() + feats[gram_key("relu2_1")].sum()).backward()
    assert order == [gram_key("relu2_1"), "relu2_1", gram_key("relu1_1")]


def test_bf16_runs_keep_the_weights_in_bf16_with_the_same_result(tiny_settings) -> None:
    """Rounding the frozen weights to bf16 once gives what autocast's per-pass rounding gave.

    The two are different code paths (a bf16 parameter vs a cast on every pass), so they are
    compared within one bf16 rounding step (2**-8 relative), not bit for bit."""
    s = tiny_settings(precision="bf16", iterations=3, pyramid=False)
    content, style = make_image(), make_image(seed=3)
    eng = Engine()
    first: list[float] = []
    eng.stylize(content, [style], s, on_progress=lambda p: first.append(p.losses["total"]))
    (model,) = eng.models.values()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    buffers = list(model.buffers())  # the input normalisation
    assert buffers and all(b.dtype == torch.float32 for b in buffers)
    fwd = Forward(model, torch.device("cpu"), torch.bfloat16, channels_last=True)
    x = to_tensor(content, torch.device("cpu"))
    with torch.no_grad():
        stored = fwd(x)
        for m in convs:
            m.float()  # back to float32 weights: autocast rounds them on every pass again
        rounded = fwd(x)
    for name, act in rounded.items():
        step = 2**-7  # two bf16 rounding steps: the output's own rounding and the sum order
        torch.testing.assert_close(
            stored[name].float(), act.float(), rtol=step, atol=step * float(act.abs().max())
        )
    eng.targets.clear()
    again: list[float] = []
    eng.stylize(content, [style], s, on_progress=lambda p: again.append(p.losses["total"]))
    assert again[0] == pytest.approx(first[0], rel=2**-7)  # the same first evaluation
    eng.clear()
    eng.stylize(content, [style], s.replace(precision="fp32"))
    (model,) = eng.models.values()
    assert all(
        m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    )


def test_colour_preservation_holds_the_photo_only_where_a_mode_reads_it() -> None:
    # "none" never reads the photo: a 4096x3072 photo's tensor is 151 MB of the run's budget.
    plain = Preservation("none", None)
    assert plain.chroma_source is None
    image = torch.rand(1, 3, 8, 8)
    assert torch.equal(plain.content_tensor(image), image)
    assert torch.equal(plain.finish(image * 2), (image * 2).clamp(0, 1))
    for mode in ("luminance", "stats"):
        with pytest.raises(ValueError, match="needs the photo"):
            Preservation(mode, None)

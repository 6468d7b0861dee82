"""The engine on a clip: temporal coherence (Ruder et al.) against painting every frame alone,
progress as frame i of n, cancelling mid-frame, style targets computed once, timing kept.

All on random weights at tiny sizes, so the numbers mean nothing as paintings; what is tested is
the mechanism: later frames follow the previous painting along the motion."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from core import flow
from core.animation import Animation, encode_animation
from core.engine import Engine, stylize_animation, stylize_frames
from core.errors import Cancelled, ImageError
from core.settings import Settings
from core.types import Progress

from .conftest import make_image
from .test_animation import moving_frames

STYLE = make_image(48, 48, seed=3)


def clip_settings(tiny_settings: Callable[..., Settings], **changes) -> Settings:
    """One scale of 32x24 and a few steps: cheap, and enough for the mechanism to show."""
    base = dict(size=32, pyramid=False, iterations=6, frame_iterations=6, seed=0)
    base.update(changes)
    return tiny_settings(**base)


def temporal_error(frames: list[Image.Image], painted: list[Image.Image]) -> float:
    """Ruder et al.'s measure: each painted frame against the previous painted frame warped by
    the *input's* flow, on the trusted pixels (the same flow for both ways of painting)."""
    size = painted[0].size
    inputs = [np.asarray(f.convert("RGB").resize(size, Image.Resampling.LANCZOS)) for f in frames]
    return flow.temporal_error([np.asarray(p.convert("RGB")) for p in painted], flow.links(inputs))


def test_coherence_at_least_halves_the_temporal_error(tiny_settings) -> None:
    frames = moving_frames(3, (64, 48))
    s = clip_settings(tiny_settings)
    coherent = stylize_frames(frames, [STYLE], s)
    alone = stylize_frames(frames, [STYLE], s.replace(temporal_weight=0.0))
    with_coherence = temporal_error(frames, coherent.images)
    without = temporal_error(frames, alone.images)
    # The bar: at least 2x lower. (When this was written: about 10x at these sizes.)
    assert with_coherence * 2 <= without, (with_coherence, without)
    assert coherent.metadata["temporal_error"] == pytest.approx(with_coherence, rel=1e-6)
    assert len(coherent.metadata["flow_trusted"]) == 2
    assert all(0.5 < share <= 1.0 for share in coherent.metadata["flow_trusted"])
    assert "temporal_error" not in alone.metadata and alone.metadata["frame_iterations"] is None


def test_later_frames_start_from_the_previous_painting_carried_along(tiny_settings) -> None:
    """With no steps after the first frame, each later frame *is* its start: the previous
    painted frame warped along the flow where the flow is trusted."""
    frames = moving_frames(3, (64, 48))
    s = clip_settings(tiny_settings, iterations=3, frame_iterations=0)
    done = stylize_frames(frames, [STYLE], s)
    size = done.images[0].size
    inputs = [np.asarray(f.resize(size, Image.Resampling.LANCZOS)) for f in frames]
    for k in (1, 2):
        join = flow.link(inputs[k - 1], inputs[k])
        carried = flow.warp(np.asarray(done.images[k - 1], np.float32), join.backward)
        got = np.asarray(done.images[k], np.float32)
        trusted = join.mask > 0
        # 8-bit rounding of the saved frames: at most one level apart where trusted.
        assert np.abs(got - carried)[trusted].max() <= 1.0 + 1e-3


def test_progress_is_frame_i_of_n_with_previews(tiny_settings) -> None:
    events: list[Progress] = []
    s = clip_settings(tiny_settings, iterations=3, frame_iterations=2, preview_every=2)
    stylize_frames(moving_frames(3, (64, 48)), [STYLE], s, on_progress=events.append)
    assert [e.frame for e in events] == [1] * 3 + [2] * 2 + [3] * 2
    assert {e.frames for e in events} == {3}
    assert [e.step for e in events] == list(range(1, 8))
    assert {e.total_steps for e in events} == {7} and events[-1].percent == 100.0
    assert all(e.eta is not None for e in events[1:]) and events[-1].eta == 0.0
    previews = [e.preview for e in events if e.preview is not None]
    assert previews and all(p.size == (32, 24) for p in previews)


def test_cancel_stops_within_a_step_in_the_middle_of_a_frame(tiny_settings) -> None:
    events: list[Progress] = []

    def stop() -> bool:
        return any(e.frame == 2 and e.iteration >= 2 for e in events)

    s = clip_settings(tiny_settings, iterations=3, frame_iterations=50)
    with pytest.raises(Cancelled):
        stylize_frames(moving_frames(3, (64, 48)), [STYLE], s, on_progress=events.append,
                       should_stop=stop)  # fmt: skip
    assert events[-1].frame == 2 and events[-1].iteration == 2


def test_style_targets_are_computed_once_for_the_clip(tiny_settings) -> None:
    for colours in ("none", "stats", "luminance"):
        engine = Engine()
        s = clip_settings(
            tiny_settings, pyramid=True, min_size=16, iterations=1, frame_iterations=1,
            preserve_colors=colours,
        )  # fmt: skip
        stylize_frames(moving_frames(3, (64, 48)), [STYLE], s, engine=engine)
        # One Gram set per scale of the first frame (two: 23 and 32 px); later frames hit.
        assert len(engine.targets) == 2, colours


def test_animation_keeps_timing_and_paints_at_most_max_frames(tiny_settings) -> None:
    frames = [f.convert("RGBA") for f in moving_frames(5, (64, 48))]
    for f in frames:
        f.putalpha(Image.linear_gradient("L").resize(f.size))
    data = encode_animation(Animation(frames, [40, 50, 60, 70, 80], loop=3), "webp")
    s = clip_settings(tiny_settings, iterations=2, frame_iterations=1, max_frames=3)
    done = stylize_animation(data, [STYLE], s)
    clip = done.animation
    assert len(clip) == 3 and clip.durations == [90, 60, 150] and clip.loop == 3  # frames 1, 3, 4
    assert clip.size == (32, 24) and clip.frames[0].mode == "RGBA"  # alpha put back
    assert done.metadata["source_frames"] == 5 and done.metadata["frames"] == 3


def test_frames_of_different_sizes_are_refused(tiny_settings) -> None:
    with pytest.raises(ImageError, match="same size"):
        stylize_frames(
            [make_image(64, 48), make_image(48, 48)], [STYLE], clip_settings(tiny_settings)
        )
    with pytest.raises(ImageError, match="at least one frame"):
        stylize_frames([], [STYLE], clip_settings(tiny_settings))

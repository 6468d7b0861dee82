"""Bot parts that need no job runner: configuration, validation, fitting under the upload
limit, the status throttle, the Cancel button's permission logic, intents and the entry point."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock, MagicMock

import discord
import pytest
from PIL import Image

from bot import __main__ as entry
from bot.config import ConfigError, config_from_dict, load_config
from bot.delivery import DM_UPLOAD_LIMIT, fit_animation_to_limit, fit_to_limit, upload_limit
from bot.status import JobStatus, ThrottledEditor, progress_bar, render
from bot.validation import fetch_image, is_image
from bot.views import GONE, NOT_YOURS, TEMPLATE, CancelButton, cancel_view, handle_cancel
from core.errors import ImageError
from core.settings import QUALITY_ITERATIONS

from .conftest import image_bytes, make_image

MiB = 1024 * 1024


# ---- configuration ----------------------------------------------------------------------------
def test_config_file_env_token_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "bot.toml").write_text(
        'token = "from-file"\npresets = "styles"\nguild_id = "42"\nworkers = 2\n'
        "[limits]\nmax_per_user = 3\ncooldown = 5\nmax_attachment_mb = 2\n"
        '[engine]\nweights = "w/vgg.pth"\nquality = "draft"\nsize = 256\n'
    )
    cfg = load_config(tmp_path / "bot.toml", env={})
    assert cfg.token == "from-file" and cfg.guild_id == 42 and cfg.workers == 2
    assert cfg.presets == tmp_path / "styles"
    assert cfg.limits.max_per_user == 3 and cfg.limits.max_attachment_bytes == 2 * MiB
    settings = cfg.engine.base_settings()
    assert settings.iterations == QUALITY_ITERATIONS["draft"] and settings.size == 256
    assert settings.weights == str(tmp_path / "w" / "vgg.pth")
    assert load_config(tmp_path / "bot.toml", env={"DISCORD_TOKEN": "env"}).token == "env"
    assert load_config(None, env={}).token is None  # no file at all: defaults


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"tokn": "x"}, "Unknown bot configuration key"),
        ({"limits": {"max_queue": 0}}, "max_queue"),
        ({"limits": {"cooldown": "soon"}}, "must be a number"),
        ({"engine": {"quality": "ultra"}}, "quality"),
        ({"engine": {"backbone": "resnet"}}, "backbone"),
        ({"engine": {"size": 4096}}, "max_size"),
        ({"message_content": "yes"}, "true or false"),
        ({"limits": {"colour": 1}}, "Unknown key(s) in [limits]"),
        ({"backend": "gpu"}, "backend must be one of local, celery"),
        ({"backend": "celery"}, "No broker URL"),
        ({"backend": "celery", "broker": "amqp://localhost"}, "redis://"),
    ],
)
def test_config_rejects_bad_values(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_dict(data)


def test_config_file_errors_are_sentences(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    (tmp_path / "bad.toml").write_text("token = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", env={})


# ---- validation -------------------------------------------------------------------------------
def attachment(data: bytes, filename="photo.png", content_type="image/png", size=None):
    return SimpleNamespace(
        filename=filename,
        content_type=content_type,
        size=len(data) if size is None else size,
        read=AsyncMock(return_value=data),
    )


async def test_fetch_image_accepts_a_real_image() -> None:
    att = attachment(image_bytes("JPEG", width=40, height=30), "me.jpg", "image/jpeg")
    upload = await fetch_image(att, what="photo", max_bytes=MiB, max_pixels=10_000)
    assert (upload.info.width, upload.info.height) == (40, 30)
    att.read.assert_awaited_once()


@pytest.mark.parametrize("content_type", ["image/heic", "application/octet-stream", None])
async def test_fetch_image_accepts_an_iphone_heic(content_type: str | None) -> None:
    """Whatever Discord calls it, a .heic photo is read by the same loader as the CLI's."""
    buf = io.BytesIO()
    make_image(40, 30).save(buf, "HEIF", quality=90)
    att = attachment(buf.getvalue(), "IMG_0001.HEIC", content_type)
    upload = await fetch_image(att, what="photo", max_bytes=MiB, max_pixels=10_000)
    assert (upload.info.format, upload.info.width, upload.info.height) == ("HEIF", 40, 30)


async def test_refusal_names_the_formats_the_cli_accepts() -> None:
    from core.images import accepted_formats

    with pytest.raises(ImageError) as err:
        await fetch_image(
            attachment(b"hello", "notes.txt", "text/plain"), what="photo", max_bytes=MiB,
            max_pixels=10_000,
        )  # fmt: skip
    assert accepted_formats() in str(err.value) and "HEIC" in str(err.value)


@pytest.mark.parametrize(
    ("att", "needle", "downloads"),
    [
        (attachment(b"hello", "notes.txt", "text/plain"), "not a picture", False),
        (attachment(image_bytes(), size=5 * MiB), "the limit is 1 MB", False),
        (attachment(b"\x89PNG\r\n\x1a\n" + b"0" * 64), "truncated or corrupt", True),
        (attachment(image_bytes(width=200, height=100)), "megapixel", True),
        (attachment(b"GIF89a-nope", "x.gif", None), "photo", True),
    ],
)
async def test_fetch_image_refuses_bad_uploads(att, needle: str, downloads: bool) -> None:
    with pytest.raises(ImageError) as err:
        await fetch_image(att, what="photo", max_bytes=MiB, max_pixels=10_000)
    assert needle in str(err.value) and str(err.value).endswith(".")
    assert att.read.await_count == (1 if downloads else 0)


def test_is_image_falls_back_to_the_extension() -> None:
    assert is_image(SimpleNamespace(content_type=None, filename="a.JPG"))
    assert not is_image(SimpleNamespace(content_type=None, filename="a.exe"))
    assert is_image(SimpleNamespace(content_type="image/webp; charset=x", filename="a"))


async def test_decode_runs_off_the_event_loop(monkeypatch) -> None:
    import bot.validation as validation

    seen = {}

    def fake_validate(data, **kwargs):
        try:
            asyncio.get_running_loop()
            seen["in_loop"] = True
        except RuntimeError:
            seen["in_loop"] = False
        return SimpleNamespace(width=1, height=1)

    monkeypatch.setattr(validation, "validate_image", fake_validate)
    await fetch_image(attachment(image_bytes()), what="photo", max_bytes=MiB, max_pixels=10**6)
    assert seen == {"in_loop": False}


# ---- delivery ---------------------------------------------------------------------------------
def test_upload_limit_sources() -> None:
    assert upload_limit(SimpleNamespace(filesize_limit=8 * MiB, guild=None)) == 8 * MiB
    guild = SimpleNamespace(filesize_limit=50 * MiB)
    assert upload_limit(SimpleNamespace(filesize_limit=None, guild=guild)) == 50 * MiB
    assert upload_limit(SimpleNamespace(guild=None)) == DM_UPLOAD_LIMIT


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_fit_keeps_a_png_that_fits() -> None:
    png = png_of(make_image(64, 48))
    fitted = fit_to_limit(png, 10 * MiB)
    assert fitted.data == png and fitted.format == "png" and not fitted.reencoded


def test_fit_reencodes_then_downscales_until_it_fits() -> None:
    png = png_of(make_image(96, 96, seed=3))
    fitted = fit_to_limit(png, len(png) - 1)  # re-encoding alone is enough
    assert fitted.reencoded and not fitted.downscaled and len(fitted.data) < len(png)
    tight = 1500
    small = fit_to_limit(png, tight, min_side=8)
    assert small.downscaled and len(small.data) <= tight
    with Image.open(io.BytesIO(small.data)) as img:
        assert img.size == (small.width, small.height) and max(img.size) < 96
        assert img.format.lower() == small.format
    with pytest.raises(ValueError):
        fit_to_limit(png, 50, min_side=64)


def test_fit_keeps_alpha_when_it_can() -> None:
    png = png_of(make_image(96, 96, mode="RGBA"))
    fitted = fit_to_limit(png, len(png) - 1)
    with Image.open(io.BytesIO(fitted.data)) as img:
        assert fitted.format == "webp" and img.mode == "RGBA"


def clip(fmt: str, frames: int = 8, side: int = 96) -> bytes:
    from core.animation import Animation, encode_animation

    from .test_animation import moving_frames

    return encode_animation(
        Animation(moving_frames(frames, (side, side * 3 // 4)), [50] * frames), fmt
    )


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
def test_fit_animation_keeps_a_clip_that_fits(fmt: str) -> None:
    data = clip(fmt)
    fitted = fit_animation_to_limit(data, fmt, 10 * MiB)
    assert fitted.data == data and fitted.frames == 8 and fitted.note() is None


@pytest.mark.parametrize("fmt", ["gif", "webp", "mp4"])
def test_fit_animation_gives_quality_then_size_then_frames(fmt: str) -> None:
    from core.animation import load_animation

    data = clip(fmt, frames=8, side=128)
    seen = set()
    for share in (3 / 4, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 64):
        limit = int(len(data) * share)
        try:
            fitted = fit_animation_to_limit(data, fmt, limit, min_side=16)
        except ValueError:
            seen.add("refused")  # even two frames at half size do not fit
            continue
        assert len(fitted.data) <= limit and fitted.reencoded and fitted.format == fmt
        back = load_animation(fitted.data)
        assert (len(back), back.size) == (fitted.frames, (fitted.width, fitted.height))
        assert back.duration_ms == 400  # fewer frames show for longer: same length
        note = fitted.note()
        assert note is not None and note.startswith("Sent ")
        seen |= {"quality"} if fitted.lower_quality else set()
        seen |= {"size"} if fitted.downscaled else set()
        if fitted.dropped_frames:
            seen.add("frames")
            assert max(back.size) == 64  # the size gave way first, down to half
            assert f"with {fitted.frames} of its 8 frames" in note
    # Each lever is used somewhere in the sweep (MP4's frames compress to almost nothing, so
    # dropping them does not help it: it runs out of size instead).
    assert {"quality", "size", "refused"} <= seen
    assert "frames" in seen or fmt == "mp4"


async def test_fetch_image_reads_every_frame_of_a_clip_and_refuses_broken_ones() -> None:
    from core.animation import AnimationLimits

    gif = clip("gif", frames=5, side=64)
    att = attachment(gif, "clip.gif", "image/gif")
    limits = AnimationLimits(max_frames=10)
    upload = await fetch_image(att, what="photo", max_bytes=MiB, max_pixels=10**6, clips=limits)
    assert upload.animation is not None and upload.frames == 5 and upload.info.width == 64
    still = await fetch_image(att, what="style image", max_bytes=MiB, max_pixels=10**6)
    assert still.animation is None  # a style is a picture: a GIF's first frame
    video = attachment(clip("mp4", frames=4), "clip.mp4", "video/mp4")
    upload = await fetch_image(video, what="photo", max_bytes=MiB, max_pixels=10**6, clips=limits)
    assert upload.animation is not None and upload.animation.video and upload.frames == 4
    with pytest.raises(ImageError, match="not a picture"):
        await fetch_image(video, what="style image", max_bytes=MiB, max_pixels=10**6)
    with pytest.raises(ImageError, match="more than 3 frames"):
        await fetch_image(
            att, what="photo", max_bytes=MiB, max_pixels=10**6, clips=AnimationLimits(max_frames=3)
        )
    broken = attachment(gif[: len(gif) // 2], "clip.gif", "image/gif")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        await fetch_image(broken, what="photo", max_bytes=MiB, max_pixels=10**6, clips=limits)


def test_render_shows_the_frame_being_painted() -> None:
    st = JobStatus(job_id="abc", label="waves", state="running", percent=30.0, frame=7, frames=24)
    embed, _ = render(st, requester="<@1>")
    assert "Frame 7 of 24" in embed.description and "30 %" in embed.description
    st.frames = 1
    assert "Frame" not in render(st, requester="<@1>")[0].description


# ---- status throttle --------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_throttle_edits_at_most_once_per_interval_and_always_shows_the_end() -> None:
    clock = FakeClock()
    edits: list[int] = []

    async def edit(n: int) -> None:
        edits.append(n)

    editor = ThrottledEditor(edit, 3.0, clock=clock)
    for n in range(10):  # a burst inside one interval: nothing yet
        clock.now += 0.2
        await editor.update(n=n)
    assert edits == []
    clock.now += 1.0  # 3 s after the post: the newest state goes out
    await editor.update(n=10)
    assert edits == [10]
    clock.now += 1.0
    await editor.update(n=11)
    await editor.final(n=99)  # terminal: at once, and the pending one is dropped
    assert edits == [10, 99] and editor.edits == 2
    await editor.update(n=100)  # nothing after the end
    assert edits == [10, 99]


async def test_throttle_shows_a_late_state_when_the_interval_ends() -> None:
    edits: list[int] = []

    async def edit(n: int) -> None:
        edits.append(n)

    editor = ThrottledEditor(edit, 0.05)
    await editor.update(n=1)
    await editor.update(n=2)
    assert edits == []
    await asyncio.sleep(0.2)
    assert edits == [2]


async def test_throttle_survives_discord_errors(caplog) -> None:
    response = SimpleNamespace(status=500, reason="boom")
    edit = AsyncMock(side_effect=discord.HTTPException(response, "boom"))
    editor = ThrottledEditor(edit, 0.0)
    with caplog.at_level(logging.WARNING):
        await editor.update(n=1)
        await editor.final(n=2)
    assert edit.await_count == 2 and "Could not edit a status message" in caplog.text


def test_render_states() -> None:
    st = JobStatus(job_id="abc", label="waves", position=3)
    embed, files = render(st, requester="<@1>")
    assert "Position in the queue: **3**" in embed.description and not files
    st.state, st.percent, st.eta, st.preview = "running", 50.0, 75.0, png_of(make_image(8, 8))
    embed, files = render(st, requester="<@1>")
    assert "50 %" in embed.description and "1 min 15 s" in embed.description
    assert files and embed.thumbnail.url == "attachment://preview.png"
    st.state, st.message = "failed", "It broke."
    embed, files = render(st, requester="<@1>")
    assert "It broke." in embed.description and not files
    assert progress_bar(0) == "▱" * 12 and progress_bar(100) == "▰" * 12


# ---- cancel button ----------------------------------------------------------------------------
def press(user_id: int):
    return SimpleNamespace(
        user=SimpleNamespace(id=user_id),
        response=SimpleNamespace(send_message=AsyncMock()),
    )


class FakeJob:
    def __init__(self) -> None:
        self.done = False
        self.cancel = AsyncMock(return_value=True)


async def test_cancel_button_is_persistent_and_for_the_requester_only() -> None:
    view = cancel_view("0123abcd", 77)
    assert view.timeout is None and view.is_persistent()
    (button,) = view.children
    custom_id = button.custom_id
    assert custom_id == "pastiche:cancel:0123abcd:77"

    # After a restart only the custom_id is left: rebuild the item from it, as discord.py does.
    match = re.fullmatch(TEMPLATE, custom_id)
    item = await CancelButton.from_custom_id(MagicMock(), MagicMock(), match)
    assert (item.job_id, item.owner_id) == ("0123abcd", 77)

    job = FakeJob()
    runner = SimpleNamespace(get=lambda job_id: job if job_id == "0123abcd" else None)
    stranger = press(5)
    await handle_cancel(stranger, runner, item.job_id, item.owner_id)
    stranger.response.send_message.assert_awaited_once_with(NOT_YOURS, ephemeral=True)
    job.cancel.assert_not_awaited()

    owner = press(77)
    await handle_cancel(owner, runner, item.job_id, item.owner_id)
    job.cancel.assert_awaited_once()
    assert owner.response.send_message.await_args.kwargs == {"ephemeral": True}

    gone = press(77)
    await handle_cancel(gone, runner, "ffff", 77)  # unknown job (e.g. after a restart)
    gone.response.send_message.assert_awaited_once_with(GONE, ephemeral=True)


# ---- bot wiring and entry point ---------------------------------------------------------------
def test_intents_are_minimal() -> None:
    from bot.app import make_intents

    intents = make_intents(config_from_dict({}))
    assert intents.guilds and intents.guild_messages and intents.dm_messages
    assert not (intents.message_content or intents.members or intents.presences)
    assert make_intents(config_from_dict({"message_content": True})).message_content


def write_presets(folder: Path, *, broken: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "waves.png").write_bytes(image_bytes(seed=4))
    text = '[[preset]]\nname = "waves"\nfile = "waves.png"\ndescription = "Blue waves"\n'
    if broken:
        text += '[[preset]]\nname = "ghost"\nfile = "missing.png"\n'
    (folder / "presets.toml").write_text(text)


def test_main_check_reports_preset_problems(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    write_presets(tmp_path / "styles", broken=True)
    (tmp_path / "bot.toml").write_text('presets = "styles"\n')
    with caplog.at_level(logging.INFO):
        assert entry.main(["--config", str(tmp_path / "bot.toml"), "--check"]) == 1
    assert "ghost" in caplog.text and "Loaded 1 style preset(s): waves" in caplog.text
    write_presets(tmp_path / "styles", broken=False)
    assert entry.main(["--config", str(tmp_path / "bot.toml"), "--check"]) == 0
    # Without a token the bot refuses to start (and never touches the network).
    assert entry.main(["--config", str(tmp_path / "bot.toml")]) == 2
    (tmp_path / "bad.toml").write_text("[limits]\nmax_queue = -1\n")
    assert entry.main(["--config", str(tmp_path / "bad.toml")]) == 2


def test_celery_backend_from_the_config(tmp_path: Path, capsys, monkeypatch) -> None:
    from bot.app import PasticheBot
    from core.jobs.celery_backend import CeleryBackend
    from core.presets import PresetLibrary

    monkeypatch.delenv("PASTICHE_BROKER_URL", raising=False)
    data = {"backend": "celery", "broker": "redis://:file@127.0.0.1:1/0", "workers": 3}
    env = {"PASTICHE_BROKER_URL": "redis://:env@127.0.0.1:1/0"}
    assert config_from_dict(data, env=env).broker == env["PASTICHE_BROKER_URL"]  # env wins
    cfg = config_from_dict(data)
    bot = PasticheBot(cfg, PresetLibrary())
    assert isinstance(bot.runner.backend, CeleryBackend) and bot.runner.backend.capacity == 3
    # --check asks the broker; nothing listens on port 1.
    (tmp_path / "bot.toml").write_text('backend = "celery"\nbroker = "redis://:pw@127.0.0.1:1/0"\n')
    assert entry.main(["--config", str(tmp_path / "bot.toml"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "Cannot reach Redis at redis://:***@127.0.0.1:1/0" in err and ":pw@" not in err


def test_bot_process_does_not_import_torch() -> None:
    code = (
        "import sys, bot.__main__, bot.app, bot.cog, core.jobs, core.presets, "
        "core.jobs.celery_backend, core.jobs.celery_worker; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_engine_memory_budget_is_an_engine_setting() -> None:
    cfg = config_from_dict({"engine": {"max_memory": "3GB"}, "limits": {"max_size": 4096}})
    assert cfg.engine.base_settings().max_memory == "3GB"
    assert config_from_dict({}).limits.max_size == 2048
    with pytest.raises(ConfigError, match="max_memory"):
        config_from_dict({"engine": {"max_memory": "plenty"}})

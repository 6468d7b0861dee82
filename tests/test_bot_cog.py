"""The cog end to end: mocked Discord objects, the real job runner with a real worker process and
the random-weight VGG19 on tiny images. Nothing here talks to Discord.

The tests that need a runner run twice: with the local backend (a spawned worker process) and
with the Celery backend (a real redis-server and a real ``pastiche worker`` with the same
random-weight checkpoint)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import itertools
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import discord
import pytest
import pytest_asyncio
from PIL import Image

from bot.app import PasticheBot
from bot.cog import CRASH, HELP, PasticheCog
from bot.config import BotConfig, Limits
from bot.origin import InteractionOrigin
from bot.views import NOT_YOURS, TEMPLATE, CancelButton
from core.images import read_metadata
from core.jobs import JobState, ProgressUpdate, Runner, RunnerConfig
from core.jobs.celery_backend import CeleryBackend
from core.presets import load_presets

from .celery_procs import Stack, celery_stack
from .conftest import image_bytes

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1024 * 1024
BOT_ID = 4242
WAIT = 120.0
_users = itertools.count(1000)


# ---- fakes ------------------------------------------------------------------------------------
class FakeMessage:
    """What followup.send / channel.send / reply return: records its edits."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs
        self.edits: list[dict[str, Any]] = []
        self.edit = AsyncMock(side_effect=self._edit)

    async def _edit(self, **kwargs: Any) -> None:
        self.edits.append(kwargs)

    @property
    def content(self) -> str:
        return self.kwargs.get("content") or (self.args[0] if self.args else "")


class Sender:
    """An AsyncMock-backed ``send``/``reply`` that logs and returns FakeMessages."""

    def __init__(self, log: list[str], name: str, fail: Exception | None = None) -> None:
        self.log, self.name, self.fail = log, name, fail
        self.messages: list[FakeMessage] = []
        self.mock = AsyncMock(side_effect=self._send)

    async def _send(self, *args: Any, **kwargs: Any) -> FakeMessage:
        self.log.append(self.name)
        if self.fail is not None and "file" in kwargs:
            raise self.fail
        message = FakeMessage(args, kwargs)
        self.messages.append(message)
        return message


def http_error(status: int = 500) -> discord.HTTPException:
    return discord.HTTPException(SimpleNamespace(status=status, reason="test"), "test failure")


def user(uid: int | None = None) -> SimpleNamespace:
    uid = next(_users) if uid is None else uid
    return SimpleNamespace(id=uid, mention=f"<@{uid}>", bot=False)


class FakeInteraction:
    def __init__(self, who=None, *, limit: int = 25 * MiB, age: float = 0.0, runner=None,
                 followup_fails: Exception | None = None) -> None:  # fmt: skip
        self.log: list[str] = []
        self.user = who or user()
        self.filesize_limit = limit
        self.guild = SimpleNamespace(filesize_limit=limit)
        self.created_at = discord.utils.utcnow() - dt.timedelta(seconds=age)
        self.followup_sender = Sender(self.log, "followup", followup_fails)
        self.channel_sender = Sender(self.log, "channel")
        self.response = SimpleNamespace(
            defer=AsyncMock(side_effect=lambda **kw: self.log.append("defer")),
            send_message=AsyncMock(side_effect=lambda *a, **kw: self.log.append("respond")),
            is_done=MagicMock(return_value=False),
        )
        self.followup = SimpleNamespace(send=self.followup_sender.mock)
        self.channel = SimpleNamespace(send=self.channel_sender.mock)
        self.client = SimpleNamespace(runner=runner)


def attachment(log: list[str], data: bytes, filename="photo.png", content_type="image/png"):
    async def read() -> bytes:
        log.append(f"read:{filename}")
        return data

    return SimpleNamespace(
        filename=filename,
        content_type=content_type,
        size=len(data),
        read=AsyncMock(side_effect=read),
    )


def files_of(message: FakeMessage) -> list[discord.File]:
    kw = message.kwargs
    return [kw["file"]] if "file" in kw else list(kw.get("files") or [])


def image_of(file: discord.File) -> Image.Image:
    file.fp.seek(0)
    img = Image.open(io.BytesIO(file.fp.read()))
    img.load()
    return img


def last_embed(message: FakeMessage) -> discord.Embed:
    return (message.edits[-1] if message.edits else message.kwargs)["embed"]


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["local", "celery"])
def painters(request, vgg19_checkpoint: Path, tmp_path_factory):
    """Where jobs are painted: None for local worker processes, else a Redis + worker stack."""
    if request.param == "local":
        yield None
        return
    args = ("--weights", str(vgg19_checkpoint), "--device", "cpu")
    with celery_stack(tmp_path_factory.mktemp("celery"), 1, *args) as stack:
        yield stack


def make_runner(config: RunnerConfig, painters: Stack | None) -> Runner:
    backend = None if painters is None else CeleryBackend(config, painters.url)
    return Runner(config, backend=backend)


def worker_pids(runner: Runner, painters: Stack | None) -> list[int]:
    """The pids of the processes that paint (for Celery: the workers' children)."""
    if painters is None:
        return runner.backend.pids
    return sorted(painters.child_pids().values())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(painters):
    config = RunnerConfig(workers=1, max_queue=2, max_per_owner=2, job_timeout=120, stop_grace=2.0)
    r = make_runner(config, painters)  # started by the first test that submits a job
    yield r
    try:
        assert r.queue_length == 0 and not r.running, "a test left a job behind"
    finally:
        await r.close()


@pytest.fixture
def presets(tmp_path: Path):
    folder = tmp_path / "styles"
    folder.mkdir()
    (folder / "waves.png").write_bytes(image_bytes(width=48, height=48, seed=7))
    (folder / "presets.toml").write_text(
        '[[preset]]\nname = "waves"\nfile = "waves.png"\ndescription = "Blue waves"\n'
        "strength = 0.7\n"
    )
    library = load_presets(folder)
    assert not library.problems
    return library


@pytest_asyncio.fixture(loop_scope="module")
async def make_cog(runner, presets, tiny_settings):
    cogs: list[PasticheCog] = []

    def make(clock=None, settings=None, sleep=None, **limits: Any) -> PasticheCog:
        values = {"cooldown": 0.0, "status_interval": 0.0, "max_attachment_mb": 1.0}
        values.update(limits)
        config = BotConfig(limits=Limits(**values))
        bot = SimpleNamespace(user=SimpleNamespace(id=BOT_ID))
        base = settings or tiny_settings(size=32, min_size=32, iterations=3)
        extra = {"clock": clock} if clock is not None else {}
        extra.update({"sleep": sleep} if sleep is not None else {})
        cogs.append(PasticheCog(bot, runner, config, presets, base_settings=base, **extra))
        return cogs[-1]

    yield make
    # After a failed test: stop what it left behind so the next test starts clean.
    for cog in cogs:
        await cog.cog_unload()
    for _ in range(100):
        if not runner.running and not runner.queue_length:
            break
        for job in runner.running:
            await job.cancel()
        await asyncio.sleep(0.1)


async def settle(cog: PasticheCog) -> None:
    """Wait until every job the cog follows has been delivered or reported."""
    while cog._tasks:
        await asyncio.wait_for(asyncio.gather(*list(cog._tasks)), WAIT)


async def eventually(condition, timeout: float = 30.0) -> None:
    """Poll ``condition`` (events reach the follower task asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def until(job, kind) -> None:
    async for event in job.events():
        if isinstance(event, kind):
            return
    raise AssertionError(f"job ended without {kind.__name__}")


def photo_and_style(log: list[str]):
    photo = attachment(
        log, image_bytes("JPEG", width=40, height=30, seed=1), "me.jpg", "image/jpeg"
    )
    style = attachment(log, image_bytes(width=32, height=32, seed=2), "art.png")
    return photo, style


def both(log: list[str]) -> dict[str, Any]:
    photo, style = photo_and_style(log)
    return {"photo": photo, "style": style}


async def stylize(cog: PasticheCog, inter: FakeInteraction, **options: Any) -> None:
    await cog.stylize.callback(cog, inter, **options)


def status_message(inter: FakeInteraction) -> FakeMessage:
    """The public status message: the followup sent with the Cancel button."""
    (status,) = [m for m in inter.followup_sender.messages if "view" in m.kwargs]
    return status


async def press_cancel(status: FakeMessage, who, runner) -> FakeInteraction:
    """Click the status message's button the way discord.py does after a restart: a new item
    is built from the custom_id alone, then its callback runs."""
    (button,) = status.kwargs["view"].children
    match = re.fullmatch(TEMPLATE, button.custom_id)
    item = await CancelButton.from_custom_id(MagicMock(), MagicMock(), match)
    press = FakeInteraction(who, runner=runner)
    await item.callback(press)
    return press


# ---- the slash command ------------------------------------------------------------------------
@pytest.mark.slow
async def test_stylize_happy_path(make_cog, tiny_settings) -> None:
    settings = tiny_settings(size=32, min_size=32, iterations=3, preview_every=1)
    cog = make_cog(settings=settings)
    inter = FakeInteraction(limit=8 * MiB)
    photo, style = photo_and_style(inter.log)
    await stylize(cog, inter, photo=photo, style=style, strength=0.3, preserve_colours="luminance")

    # Deferred before any download, then the ephemeral answer and the public status.
    assert inter.log[0] == "defer" and inter.log.index("read:me.jpg") > 0
    assert inter.response.defer.await_args.kwargs == {"ephemeral": True, "thinking": True}
    ack = inter.followup_sender.messages[0]
    assert ack.kwargs.get("ephemeral") is True and "queue" in ack.content
    status = status_message(inter)
    assert status.kwargs.get("ephemeral") is None and status.kwargs["wait"] is True
    (button,) = status.kwargs["view"].children
    assert button.custom_id.endswith(f":{inter.user.id}") and button.item.label == "Cancel"
    first = status.kwargs["embed"]
    assert first.title == "Painting…" or "Position in the queue: **1**" in first.description

    await settle(cog)
    descriptions = [e["embed"].description for e in status.edits]
    assert len(status.edits) >= 4  # interval 0: every state is shown
    assert any(re.search(r"\d+ %", d) for d in descriptions), descriptions
    assert any(f.filename == "preview.png" for e in status.edits for f in e["attachments"])
    final = status.edits[-1]
    assert final["embed"].title == "Finished" and final["view"] is None and not final["attachments"]

    result = inter.followup_sender.messages[-1]
    (file,) = files_of(result)
    img = image_of(file)
    assert img.format == "PNG" and max(img.size) == 32
    file.fp.seek(0)
    png = file.fp.read()
    assert len(png) <= 8 * MiB
    assert read_metadata(png)["extra"]["front_end"] == "discord"
    fields = {f.name: f.value for f in result.kwargs["embed"].fields}
    assert fields["Style"] == "your image" and fields["Strength"] == "0.30"
    assert fields["Preserve colours"] == "luminance" and fields["Size"] == "32×24"
    assert str(inter.user.id) in result.content


@pytest.mark.slow
async def test_a_heic_selfie_keeps_its_face_and_a_panorama_gets_a_note(make_cog) -> None:
    """/stylize takes an iPhone HEIC (the CLI's loader), passes keep_faces on, and the result's
    embed says how many faces were kept; a thin panorama is painted larger, with a note."""
    from skimage import data

    cog = make_cog()
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).crop((103, 16, 343, 256)).save(buf, "HEIF", quality=90)
    inter = FakeInteraction(limit=8 * MiB)
    photo = attachment(inter.log, buf.getvalue(), "IMG_0001.HEIC", "image/heic")
    style = attachment(inter.log, image_bytes(width=32, height=32, seed=2), "art.png")
    await stylize(cog, inter, photo=photo, style=style, keep_faces=0.8)
    await settle(cog)
    fields = {f.name: f.value for f in inter.followup_sender.messages[-1].kwargs["embed"].fields}
    assert fields["Faces"] == "1 kept (0.80)" and "Note" not in fields

    inter = FakeInteraction(limit=8 * MiB)
    photo = attachment(inter.log, image_bytes(width=400, height=20, seed=1), "pano.png")
    style = attachment(inter.log, image_bytes(width=32, height=32, seed=2), "art.png")
    await stylize(cog, inter, photo=photo, style=style)
    await settle(cog)
    result = inter.followup_sender.messages[-1]
    fields = {f.name: f.value for f in result.kwargs["embed"].fields}
    assert fields["Faces"] == "none found" and fields["Size"] == "320×16"
    assert "very thin (400x20)" in fields["Note"] and "320x16" in fields["Note"]


async def test_gif_comes_back_animated_with_frame_progress(make_cog, tiny_settings) -> None:
    """A GIF attached to /stylize: painted frame by frame by the real engine (at most
    max_frames of them), "Frame i of n" in the status, and an animated GIF back with the
    clip's timing; fitted to the upload limit with fewer frames or a smaller size, saying so."""
    from core.animation import Animation, encode_animation, load_animation

    from .test_animation import moving_frames

    settings = tiny_settings(size=32, min_size=32, iterations=2, frame_iterations=1)
    cog = make_cog(settings=settings, max_frames=3, animation_size=32)
    gif = encode_animation(Animation(moving_frames(5, (64, 48)), [80] * 5, loop=0), "gif")
    inter = FakeInteraction(limit=25 * MiB)
    photo = attachment(inter.log, gif, "clip.gif", "image/gif")
    style = attachment(inter.log, image_bytes(width=32, height=32, seed=2), "art.png")
    await stylize(cog, inter, photo=photo, style=style)
    await settle(cog)
    status = status_message(inter)
    descriptions = [e["embed"].description for e in status.edits]
    # Which frames show depends on the status throttle (one edit per interval): any of them will do.
    assert any(f"Frame {i} of 3" in d for d in descriptions for i in (1, 2, 3)), descriptions
    assert status.edits[-1]["embed"].title == "Finished"
    result = inter.followup_sender.messages[-1]
    (file,) = files_of(result)
    file.fp.seek(0)
    clip = load_animation(file.fp.read())
    assert file.filename.endswith(".gif") and len(clip) == 3 and clip.size == (32, 24)
    assert clip.duration_ms == 400 and clip.loop == 0  # the clip's length, fewer frames
    fields = {f.name: f.value for f in result.kwargs["embed"].fields}
    assert fields["Frames"] == "3 of 5 (evenly spread)" and fields["Size"] == "32×24"
    assert result.kwargs["embed"].image.url == f"attachment://{file.filename}"


@pytest.mark.slow
async def test_video_by_mention_comes_back_as_mp4_within_a_small_limit(make_cog, tiny_settings):
    from core.animation import Animation, encode_animation, load_animation

    from .test_animation import moving_frames

    settings = tiny_settings(size=32, min_size=32, iterations=2, frame_iterations=1)
    cog = make_cog(settings=settings, max_frames=4, animation_size=32)
    mp4 = encode_animation(Animation(moving_frames(4, (64, 48)), [100] * 4), "mp4")
    log: list[str] = []
    video = attachment(log, mp4, "clip.mp4", "video/mp4")
    style = attachment(log, image_bytes(width=32, height=32, seed=2), "art.png")
    msg, replies, _ = message(f"<@{BOT_ID}> paint this", [video, style])
    await cog.on_message(msg)
    await settle(cog)
    status, result = replies.messages
    assert status.edits[-1]["embed"].title == "Finished"
    file = result.kwargs["file"]
    file.fp.seek(0)
    clip = load_animation(file.fp.read())
    assert file.filename.endswith(".mp4") and len(clip) == 4 and clip.duration_ms == 400
    assert result.kwargs["embed"].image.url is None  # the video plays as the attachment


async def test_animation_over_the_limit_is_sent_smaller_saying_so(make_cog, tiny_settings):
    from bot.status import JobStatus
    from core.animation import Animation, encode_animation, load_animation
    from core.jobs import Done

    from .test_animation import moving_frames

    cog = make_cog()
    gif = encode_animation(Animation(moving_frames(8, (128, 96)), [50] * 8), "gif")
    limit = len(gif) // 12
    inter = FakeInteraction(limit=limit)
    status = JobStatus(job_id="j2", label="waves", state="running")
    done = Done("j2", gif, {"source_frames": 8}, 128, 96, "image/gif", 8)
    await cog._deliver(SimpleNamespace(id="j2"), done, InteractionOrigin(inter), status,
                       tiny_settings(), 1.0)  # fmt: skip
    assert status.state == "done", status.message
    result = inter.followup_sender.messages[-1]
    file = result.kwargs["file"]
    file.fp.seek(0)
    data = file.fp.read()
    clip = load_animation(data)
    assert len(data) <= limit and clip.duration_ms == 400 and max(clip.size) < 128
    footer = result.kwargs["embed"].footer.text
    assert footer.startswith("Sent ") and footer.endswith("to fit Discord's upload limit.")
    assert "at a smaller size" in footer
    if len(clip) < 8:
        assert f"with {len(clip)} of its 8 frames" in footer


@pytest.mark.slow
async def test_status_edits_are_throttled(make_cog) -> None:
    async def never(seconds: float) -> None:  # injected time stands still
        await asyncio.Event().wait()

    clock = SimpleNamespace(now=50.0)
    cog = make_cog(clock=lambda: clock.now, sleep=never, status_interval=3.0)
    inter = FakeInteraction()
    photo, style = photo_and_style(inter.log)
    await stylize(cog, inter, photo=photo, style=style)
    (job,) = cog.runner.jobs_of(str(inter.user.id))
    await settle(cog)
    # Many events, no time passed on the injected clock: only the terminal state is shown.
    assert job.progress is not None and job.progress.step >= 3
    status = status_message(inter)
    assert len(status.edits) == 1 and status.edits[0]["embed"].title == "Finished"


@pytest.mark.slow
async def test_cancel_by_requester_only_while_running(make_cog, tiny_settings, runner) -> None:
    cog = make_cog(settings=tiny_settings(size=32, min_size=32, iterations=5000))
    inter = FakeInteraction()
    photo, style = photo_and_style(inter.log)
    await stylize(cog, inter, photo=photo, style=style)
    (job,) = runner.jobs_of(str(inter.user.id))
    await asyncio.wait_for(until(job, ProgressUpdate), WAIT)
    status = status_message(inter)

    stranger = await press_cancel(status, user(), runner)
    stranger.response.send_message.assert_awaited_once_with(NOT_YOURS, ephemeral=True)
    assert job.state is JobState.RUNNING

    owner = await press_cancel(status, inter.user, runner)
    assert owner.response.send_message.await_args.kwargs == {"ephemeral": True}
    await settle(cog)
    assert job.state is JobState.CANCELLED
    assert status.edits[-1]["embed"].title == "Cancelled" and status.edits[-1]["view"] is None
    assert not any(files_of(m) for m in inter.followup_sender.messages[2:])


@pytest.mark.slow
async def test_limits_full_queue_queue_command_and_cancel_while_queued(
    make_cog, tiny_settings, runner
) -> None:
    cog = make_cog(settings=tiny_settings(size=32, min_size=32, iterations=5000))
    alice, bob = user(), user()
    first, second, third = (FakeInteraction(alice) for _ in range(3))
    for inter in (first, second, third):
        await stylize(cog, inter, photo=photo_and_style(inter.log)[0], preset="waves")
    refused = third.followup_sender.messages[-1]
    assert refused.kwargs["ephemeral"] is True and "limit is 2" in refused.content
    assert len(runner.jobs_of(str(alice.id))) == 2

    from_bob = FakeInteraction(bob)
    await stylize(cog, from_bob, photo=photo_and_style(from_bob.log)[0], preset="waves")
    carol = FakeInteraction()
    await stylize(cog, carol, photo=photo_and_style(carol.log)[0], preset="waves")
    full = carol.followup_sender.messages[-1]
    assert full.kwargs["ephemeral"] is True and "queue is full" in full.content
    assert not runner.jobs_of(str(carol.user.id))

    # /queue: where Alice's jobs stand, only for her.
    ask = FakeInteraction(alice)
    await cog.queue.callback(cog, ask)
    text = ask.response.send_message.await_args.args[0]
    assert ask.response.send_message.await_args.kwargs == {"ephemeral": True}
    assert "waiting, position 1" in text and "Jobs waiting in total: 2" in text

    # Cancel Alice's queued job: Bob moves up to "next".
    await press_cancel(status_message(second), alice, runner)
    bob_status = status_message(from_bob)
    await eventually(lambda: "You are next" in last_embed(bob_status).description)
    for job in runner.jobs_of(str(alice.id)) + runner.jobs_of(str(bob.id)):
        await job.cancel()
    await settle(cog)
    assert status_message(second).edits[-1]["embed"].title == "Cancelled"


@pytest.mark.slow
async def test_cooldown_between_submissions(make_cog) -> None:
    clock = SimpleNamespace(now=0.0)
    cog = make_cog(clock=lambda: clock.now, cooldown=30.0)
    who = user()
    first, early, later = FakeInteraction(who), FakeInteraction(who), FakeInteraction(who)
    await stylize(cog, first, photo=photo_and_style(first.log)[0], preset="waves")
    clock.now = 10.0
    await stylize(cog, early, photo=photo_and_style(early.log)[0], preset="waves")
    (refusal,) = early.followup_sender.messages
    assert "wait 20 more seconds" in refusal.content and refusal.kwargs["ephemeral"] is True
    assert not any(x.startswith("read") for x in early.log)  # refused before downloading
    await settle(cog)
    clock.now = 41.0
    await stylize(cog, later, photo=photo_and_style(later.log)[0], preset="waves")
    await settle(cog)
    assert files_of(later.followup_sender.messages[-1])


BAD_UPLOADS = [
    ({"photo": ("notes.txt", "text/plain", b"hello")}, "not a picture"),
    ({"photo": ("big.png", "image/png", b"\x89PNG" + b"\0" * (MiB + 10))}, "the limit is 1 MB"),
    ({"photo": ("broken.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"x" * 99)}, "corrupt"),
    ({"style": ("s.gif", "image/gif", b"GIF89a....")}, "style image"),
    ({"preset": "nope"}, "no style preset called 'nope'"),
    ({"preset": "waves", "style": ("s.png", "image/png", image_bytes())}, "not both"),
    ({"style": None}, "Attach a style image or choose a preset"),
    ({"preset": "waves", "size": 2049}, "largest size"),
]


@pytest.mark.parametrize(("options", "needle"), BAD_UPLOADS)
async def test_bad_requests_get_a_clear_ephemeral_answer(make_cog, runner, options, needle) -> None:
    cog = make_cog()
    inter = FakeInteraction()
    kwargs: dict[str, Any] = {"photo": attachment(inter.log, image_bytes(), "me.png")}
    for key, value in options.items():
        kwargs[key] = (
            attachment(inter.log, value[2], value[0], value[1])
            if isinstance(value, tuple)
            else value
        )
    if "style" not in kwargs and "preset" not in kwargs:
        kwargs["preset"] = "waves"
    await stylize(cog, inter, **kwargs)
    assert inter.log[0] == "defer"
    (answer,) = inter.followup_sender.messages
    assert needle in answer.content and answer.kwargs["ephemeral"] is True
    assert answer.content.endswith(".")
    assert not runner.jobs_of(str(inter.user.id)) and not cog._tasks


@pytest.mark.slow
async def test_worker_crash_is_reported_and_the_bot_carries_on(
    make_cog, tiny_settings, runner, painters
):
    cog = make_cog(settings=tiny_settings(size=32, min_size=32, iterations=5000))
    inter = FakeInteraction()
    await stylize(cog, inter, **both(inter.log))
    (job,) = runner.jobs_of(str(inter.user.id))
    await asyncio.wait_for(until(job, ProgressUpdate), WAIT)
    (pid,) = worker_pids(runner, painters)
    os.kill(pid, signal.SIGKILL)
    await settle(cog)
    final = status_message(inter).edits[-1]["embed"]
    assert final.title == "That did not work" and "stopped unexpectedly" in final.description

    cog.base_settings = tiny_settings(size=32, min_size=32, iterations=2)
    again = FakeInteraction(inter.user)
    await stylize(cog, again, **both(again.log))
    await settle(cog)
    assert image_of(files_of(again.followup_sender.messages[-1])[0]).format == "PNG"
    assert worker_pids(runner, painters) and worker_pids(runner, painters) != [pid]


@pytest.mark.slow
async def test_result_over_the_limit_is_shrunk_and_old_tokens_use_the_channel(make_cog) -> None:
    cog = make_cog()
    limit = 700
    inter = FakeInteraction(limit=limit)
    await stylize(cog, inter, **both(inter.log))
    inter.created_at -= dt.timedelta(minutes=15)  # the job outlives the interaction token
    await settle(cog)
    # Status and result went through the channel: the followup webhook is dead by now.
    assert not status_message(inter).edits
    channel_status, *result = inter.channel_sender.messages
    assert "view" in channel_status.kwargs
    assert channel_status.edits[-1]["embed"].title == "Finished"
    assert len(result) == 1 and len(inter.followup_sender.messages) == 2
    (file,) = files_of(result[0])
    file.fp.seek(0)
    data = file.fp.read()
    assert len(data) <= limit and Image.open(io.BytesIO(data)).format in ("WEBP", "JPEG")
    assert "upload limit" in result[0].kwargs["embed"].footer.text


async def test_failed_followup_upload_falls_back_to_the_channel() -> None:
    inter = FakeInteraction(followup_fails=http_error(413))
    origin = InteractionOrigin(inter)  # type: ignore[arg-type]
    embed = discord.Embed(title="x")

    def make_file() -> discord.File:
        return discord.File(io.BytesIO(b"data"), filename="a.png")

    await origin.deliver("here", embed, make_file)
    assert inter.log == ["followup", "channel"]
    assert inter.channel_sender.messages[0].kwargs["file"].filename == "a.png"


# ---- the mention path -------------------------------------------------------------------------
def message(content: str, attachments=(), *, author=None, reference=None, limit=25 * MiB):
    log: list[str] = []
    replies = Sender(log, "reply")
    channel = Sender(log, "channel")
    msg = SimpleNamespace(
        id=next(_users),
        content=content,
        author=author or user(),
        attachments=list(attachments),
        reference=reference,
        guild=SimpleNamespace(filesize_limit=limit),
        channel=SimpleNamespace(send=channel.mock, fetch_message=AsyncMock()),
        reply=replies.mock,
    )
    return msg, replies, log


@pytest.mark.slow
async def test_mention_with_photo_and_style(make_cog) -> None:
    cog = make_cog()
    log: list[str] = []
    msg, replies, _ = message(f"<@{BOT_ID}> paint me", photo_and_style(log))
    await cog.on_message(msg)
    await settle(cog)
    status, result = replies.messages
    assert "view" in status.kwargs and status.edits[-1]["embed"].title == "Finished"
    assert image_of(result.kwargs["file"]).format == "PNG"
    assert {f.name: f.value for f in result.kwargs["embed"].fields}["Style"] == "your image"


@pytest.mark.slow
async def test_mention_replying_to_a_photo_with_a_preset_name(make_cog) -> None:
    cog = make_cog()
    log: list[str] = []
    photo, _ = photo_and_style(log)
    earlier = SimpleNamespace(attachments=[photo])
    ref = SimpleNamespace(message_id=1, resolved=earlier)
    msg, replies, _ = message(f"<@!{BOT_ID}> in WAVES please, strength 0.9", reference=ref)
    await cog.on_message(msg)
    await settle(cog)
    result = replies.messages[-1]
    fields = {f.name: f.value for f in result.kwargs["embed"].fields}
    assert fields["Style"] == "waves" and fields["Strength"] == "0.90"


async def test_mentions_that_are_not_requests(make_cog) -> None:
    cog = make_cog()
    quiet, replies, _ = message("no mention here", [attachment([], image_bytes())])
    await cog.on_message(quiet)
    from_bot, bot_replies, _ = message(f"<@{BOT_ID}>", author=SimpleNamespace(id=1, bot=True))
    await cog.on_message(from_bot)
    assert not replies.messages and not bot_replies.messages

    bare, bare_replies, _ = message(f"<@{BOT_ID}> hello")
    await cog.on_message(bare)
    assert bare_replies.messages[0].content == HELP

    ref = SimpleNamespace(message_id=1, resolved=SimpleNamespace(attachments=[]))
    blind, blind_replies, _ = message(f"<@{BOT_ID}> waves", reference=ref)
    await cog.on_message(blind)
    assert "Message Content intent" in blind_replies.messages[0].content

    bad, bad_replies, _ = message(f"<@{BOT_ID}>", [attachment([], b"x", "a.txt", "text/plain")])
    await cog.on_message(bad)
    assert "not a picture" in bad_replies.messages[0].content and not cog._tasks


# ---- presets: /styles and autocomplete --------------------------------------------------------
async def test_styles_lists_presets_with_thumbnails(make_cog) -> None:
    cog = make_cog()
    inter = FakeInteraction()
    await cog.styles.callback(cog, inter)
    assert inter.log[0] == "defer"
    (sent,) = inter.followup_sender.messages
    (embed,) = sent.kwargs["embeds"]
    (file,) = sent.kwargs["files"]
    assert embed.title == "waves" and embed.thumbnail.url == f"attachment://{file.filename}"
    thumb = image_of(file)
    assert thumb.format == "JPEG" and max(thumb.size) <= 128


async def test_preset_autocomplete(make_cog) -> None:
    cog = make_cog()
    assert cog.stylize.get_parameter("preset").autocomplete
    by_name = await cog.preset_autocomplete(FakeInteraction(), "wa")
    by_text = await cog.preset_autocomplete(FakeInteraction(), "BLUE")
    assert [c.value for c in by_name] == [c.value for c in by_text] == ["waves"]
    assert by_name[0].name == "waves — Blue waves"
    assert await cog.preset_autocomplete(FakeInteraction(), "zzz") == []


# ---- the bot object ---------------------------------------------------------------------------
async def test_setup_hook_wires_cog_commands_button_and_guild_sync(runner, presets) -> None:
    config = BotConfig(guild_id=123)
    bot = PasticheBot(config, presets, runner=runner)
    bot.tree.sync = AsyncMock(return_value=[])
    await bot.setup_hook()  # starts the runner (idempotent) and syncs to the one guild
    assert isinstance(bot.get_cog("Pastiche"), PasticheCog)
    names = {c.name for c in bot.tree.get_commands(guild=discord.Object(123))}
    assert names == {"stylize", "queue", "styles"}
    assert bot.tree.sync.await_args.kwargs["guild"].id == 123
    assert CancelButton in bot._connection._view_store._dynamic_items.values()
    assert CRASH.endswith(".")


async def test_unhandled_command_errors_are_reported(make_cog, caplog) -> None:
    cog = make_cog()
    inter = FakeInteraction()
    inter.command = SimpleNamespace(name="styles")
    inter.response.is_done = MagicMock(return_value=True)
    error = discord.app_commands.CommandInvokeError(cog.styles, RuntimeError("disk gone"))
    await cog.cog_app_command_error(inter, error)
    (answer,) = inter.followup_sender.messages
    assert answer.content == CRASH and answer.kwargs["ephemeral"] is True
    assert "/styles failed" in caplog.text and "disk gone" in caplog.text


@pytest.mark.slow
async def test_shutdown_tells_users_their_jobs_were_cancelled(
    presets, tiny_settings, painters
) -> None:
    own = make_runner(RunnerConfig(engine="tests.fake_engines:paint", stop_grace=2.0), painters)
    limits = Limits(cooldown=0.0, status_interval=0.0)
    bot = PasticheBot(BotConfig(limits=limits), presets, runner=own,
                      base_settings=tiny_settings(iterations=100_000))  # fmt: skip
    bot.tree.sync = AsyncMock(return_value=[])
    await bot.setup_hook()
    cog = bot.get_cog("Pastiche")
    inter = FakeInteraction()
    await stylize(cog, inter, photo=photo_and_style(inter.log)[0], preset="waves")
    (job,) = own.jobs_of(str(inter.user.id))
    await asyncio.wait_for(until(job, ProgressUpdate), WAIT)
    await asyncio.wait_for(bot.close(), WAIT)
    final = status_message(inter).edits[-1]
    assert final["embed"].title == "Cancelled" and "shut down" in final["embed"].description
    assert final["view"] is None and not cog._tasks


@pytest.mark.parametrize("limit", [25 * MiB, 10])
async def test_delivery_failures_are_reported_not_raised(make_cog, tiny_settings, limit, caplog):
    from bot.status import JobStatus
    from core.jobs import Done

    cog = make_cog()
    inter = FakeInteraction(limit=limit, followup_fails=http_error(413))
    inter.channel_sender.fail = http_error(403)  # and the channel refuses too
    png = image_bytes(width=64, height=48)
    status = JobStatus(job_id="j1", label="waves", state="running")
    done = Done("j1", png, {}, 64, 48)
    await cog._deliver(SimpleNamespace(id="j1"), done, InteractionOrigin(inter), status,
                       tiny_settings(), 1.0)  # fmt: skip
    assert status.state == "failed" and status.message.endswith(".")
    if limit == 10:
        assert "too large to upload" in status.message and not inter.log
    else:
        assert "could not upload it to Discord" in status.message
        assert inter.log == ["followup", "channel"] and "could not upload" in caplog.text

"""Slash commands (/stylize, /queue, /styles) and the mention path, on top of core.jobs.

Every request goes the same way: answer Discord at once (defer), check the uploads (type, size,
full decode in a thread), submit to the runner, post one status message with a Cancel button,
follow the job's events (throttled edits) and upload the result sized to fit the channel.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from core.animation import AnimationLimits
from core.errors import BusyError, PasticheError, SettingsError
from core.images import accepted_formats
from core.jobs import (
    Done,
    Failed,
    Job,
    JobCancelled,
    JobRequest,
    JobState,
    Preview,
    ProgressUpdate,
    Queued,
    Runner,
    Started,
)
from core.presets import PresetLibrary
from core.requests import request_settings
from core.settings import PreserveColors, Settings

from .config import BotConfig
from .delivery import fit_animation_to_limit, fit_to_limit, settings_embed
from .origin import InteractionOrigin, MessageOrigin, Origin
from .status import JobStatus, ThrottledEditor, render
from .thumbnails import thumbnail
from .validation import check_attachment, fetch_image
from .views import cancel_view

log = logging.getLogger(__name__)

HELP = (
    "Send me a photo and a style: `/stylize photo:<image> style:<image>` or `preset:<name>`, "
    "or mention me in a message with the photo (and a style image or a preset name) attached. "
    "`/styles` lists the presets."
)
CRASH = "Something went wrong on my side while handling your job; the operator has the details."
_STRENGTH = re.compile(r"\bstrength\s*[=:]?\s*(0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\b", re.I)


@dataclass(frozen=True)
class StyleChoice:
    data: bytes
    label: str
    strength: float | None  # the preset's default strength


class PasticheCog(commands.Cog, name="Pastiche"):
    """Stylization requests from slash commands and mentions."""

    def __init__(
        self,
        bot: commands.Bot,
        runner: Runner,
        config: BotConfig,
        presets: PresetLibrary,
        *,
        base_settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.bot = bot
        self.runner = runner
        self.config = config
        self.presets = presets
        self.base_settings = base_settings or config.engine.base_settings()
        self.clock = clock  # injectable, with sleep, for the status throttle and cooldowns
        self.sleep = sleep
        self._last_submit: dict[int, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._thumbs: dict[str, bytes] = {}

    async def cog_unload(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def drain(self, timeout: float) -> None:
        """Wait (a while) for the followers to post their last status edits."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Anything a command did not handle itself: log it, tell the user, carry on."""
        name = interaction.command.name if interaction.command else "?"
        log.error("/%s failed", name, exc_info=error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(CRASH, ephemeral=True)
            else:
                await interaction.response.send_message(CRASH, ephemeral=True)
        except discord.DiscordException as exc:
            log.warning("Could not report the failure of /%s: %s", name, exc)

    # ---- slash commands ------------------------------------------------------------------
    @app_commands.command(name="stylize", description="Paint a photo in the style of an image.")
    @app_commands.describe(
        photo=f"The photo to paint ({accepted_formats()}), or a GIF or short video to paint frame by frame.",
        style="A painting whose style to copy.",
        preset="Or one of the bot's style presets (see /styles).",
        strength="0 = close to the photo, 1 = mostly style; default: the preset's, else 0.5.",
        size="Long side of the result in pixels.",
        preserve_colours="Keep the photo's colours: luminance or stats (colour matching).",
        keep_faces="Keep faces recognisable: 0 = paint them like the rest, 1 = most; default 0.5.",
    )
    async def stylize(
        self,
        interaction: discord.Interaction,
        photo: discord.Attachment,
        style: discord.Attachment | None = None,
        preset: str | None = None,
        strength: app_commands.Range[float, 0.0, 1.0] | None = None,
        size: app_commands.Range[int, 64, 4096] | None = None,
        preserve_colours: PreserveColors | None = None,
        keep_faces: app_commands.Range[float, 0.0, 1.0] | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # within 3 s, always
        await self.submit(
            InteractionOrigin(interaction),
            photo=photo,
            style=style,
            preset=preset,
            strength=strength,
            size=size,
            preserve_colours=preserve_colours,
            keep_faces=keep_faces,
        )

    @stylize.autocomplete("preset")
    async def preset_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        needle = current.strip().lower()
        found = [
            p
            for p in self.presets.presets.values()
            if needle in p.name or needle in p.description.lower()
        ]
        found.sort(key=lambda p: (not p.name.startswith(needle), p.name))
        return [
            app_commands.Choice(
                name=(f"{p.name} — {p.description}" if p.description else p.name)[:100],
                value=p.name,
            )
            for p in found[:25]
        ]

    @app_commands.command(name="queue", description="Where your paintings stand.")
    async def queue(self, interaction: discord.Interaction) -> None:
        jobs = self.runner.jobs_of(str(interaction.user.id))
        lines = [describe_job(job) for job in jobs] or ["You have no jobs queued or running."]
        waiting = self.runner.queue_length
        lines.append(f"Jobs waiting in total: {waiting} (limit {self.config.limits.max_queue}).")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="styles", description="The style presets you can use.")
    async def styles(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        presets = sorted(self.presets.presets.values(), key=lambda p: p.name)
        if not presets:
            await interaction.followup.send(
                "No style presets are installed; attach your own style image to /stylize.",
                ephemeral=True,
            )
            return
        for start in range(0, len(presets), 10):  # 10 embeds and 10 files per message
            embeds, files = [], []
            for i, preset in enumerate(presets[start : start + 10]):
                name = f"thumb{start + i}.jpg"
                embed = discord.Embed(title=preset.name, description=preset.description or None)
                if preset.strength is not None:
                    embed.add_field(name="Default strength", value=f"{preset.strength:.2f}")
                thumb = await self._thumbnail(preset.name)
                if thumb is not None:
                    files.append(discord.File(io.BytesIO(thumb), filename=name))
                    embed.set_thumbnail(url=f"attachment://{name}")
                embeds.append(embed)
            await interaction.followup.send(embeds=embeds, files=files, ephemeral=True)

    async def _thumbnail(self, name: str) -> bytes | None:
        if name not in self._thumbs:
            try:
                data = await asyncio.to_thread(self.presets.presets[name].read_bytes)
                self._thumbs[name] = await asyncio.to_thread(thumbnail, data)
            except (OSError, PasticheError) as exc:  # the file changed since start-up
                log.warning("No thumbnail for preset %s: %s", name, exc)
                return None
        return self._thumbs[name]

    # ---- the mention path ----------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or message.author.bot:
            return
        mentioned = re.search(rf"<@!?{me.id}>", message.content or "") is not None
        if not mentioned and message.guild is not None:
            return
        try:
            await self.handle_mention(message)
        except Exception:  # never let one message take the listener down
            log.exception("Failed to handle message %s", getattr(message, "id", "?"))

    async def handle_mention(self, message: discord.Message) -> None:
        origin = MessageOrigin(message)
        own = list(message.attachments)
        replied = await self._replied_to(message)
        theirs = list(getattr(replied, "attachments", None) or [])
        if theirs:
            photo, style = theirs[0], (own[0] if own else None)
        elif own:
            photo, style = own[0], (own[1] if len(own) > 1 else None)
        else:
            text = HELP
            if replied is not None and not self.config.message_content:
                text = (
                    "I cannot see any image in the message you replied to (without the "
                    "Message Content intent I only see messages that mention me); attach "
                    "the photo to your mention instead. " + HELP
                )
            await origin.tell(text)
            return
        words = _words(message.content or "")
        preset = None if style is not None else self._preset_in(words)
        strength = _strength_in(message.content or "")
        await self.submit(origin, photo=photo, style=style, preset=preset, strength=strength)

    async def _replied_to(self, message: discord.Message) -> Any:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        resolved = ref.resolved
        if resolved is not None and hasattr(resolved, "attachments"):
            return resolved
        try:
            return await message.channel.fetch_message(ref.message_id)
        except discord.HTTPException as exc:
            log.info("Could not fetch replied-to message %s: %s", ref.message_id, exc)
            return None

    def _preset_in(self, words: list[str]) -> str | None:
        for word in words:
            if word in self.presets.presets:
                return word
        return None

    # ---- shared by both paths ------------------------------------------------------------
    async def submit(
        self,
        origin: Origin,
        *,
        photo: Any,
        style: Any = None,
        preset: str | None = None,
        strength: float | None = None,
        size: int | None = None,
        preserve_colours: str | None = None,
        keep_faces: float | None = None,
    ) -> Job | None:
        """Validate, queue and start following one request; errors go back to the user."""
        user_id = origin.user.id
        limits = self.config.limits
        try:
            self._check_cooldown(user_id)
            check_attachment(
                photo, what="photo", max_bytes=limits.max_attachment_bytes, videos=True
            )
            chosen = await self._choose_style(style, preset)
            upload = await fetch_image(
                photo, what="photo", max_bytes=limits.max_attachment_bytes,
                max_pixels=limits.max_pixels, clips=self._clip_limits(),
                clip_side=limits.animation_size,
            )  # fmt: skip
            settings = self._settings(chosen, strength, size, preserve_colours, keep_faces)
            clip_format = None
            if upload.animation is not None:  # a GIF or a video: fewer frames, smaller
                settings = settings.replace(
                    size=min(settings.size, limits.animation_size), max_frames=limits.max_frames
                )
                clip_format = "mp4" if upload.animation.video else "gif"  # what Discord plays
            request = JobRequest(
                content=upload.data, styles=((chosen.data, 1.0),), settings=settings,
                label=chosen.label, animation_format=clip_format,
            )  # fmt: skip
            job = await self.runner.submit(request, owner=str(user_id))
        except PasticheError as exc:
            log.info("Refused a request from %s: %s", user_id, exc)
            await self._tell(origin, str(exc))
            return None
        except Exception:
            log.exception("Unexpected error while accepting a request from %s", user_id)
            await self._tell(origin, CRASH)
            return None
        self._last_submit[user_id] = self.clock()
        log.info("job %s: %s queued %r at %s", job.id, user_id, chosen.label, job.position)
        # Answer at once with the queue position; the follower keeps this message current.
        status = JobStatus(job_id=job.id, label=chosen.label, position=job.position)
        if job.state is JobState.RUNNING:  # an idle worker took it at once
            status.state = "running"
        view = cancel_view(job.id, user_id)
        try:
            await origin.post_status(**self._state(status, view, origin.user.mention))
        except Exception as exc:  # the job still runs and is still delivered
            log.warning("job %s: could not post its status message: %r", job.id, exc)
        task = asyncio.create_task(self._follow(job, origin, status, view, settings))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _clip_limits(self) -> AnimationLimits:
        limits = self.config.limits
        return AnimationLimits(max_seconds=limits.max_clip_seconds, max_pixels=limits.max_pixels)

    async def _tell(self, origin: Origin, text: str) -> None:
        try:
            await origin.tell(text)
        except discord.DiscordException as exc:
            log.warning("Could not tell %s: %r (%s)", origin.user.id, text, exc)

    def _check_cooldown(self, user_id: int) -> None:
        last = self._last_submit.get(user_id)
        wait = self.config.limits.cooldown - (self.clock() - last) if last is not None else 0
        if wait > 0:
            raise BusyError(
                f"Please wait {wait:.0f} more seconds before asking for another painting."
            )

    async def _choose_style(self, style: Any, preset: str | None) -> StyleChoice:
        if style is not None and preset:
            raise SettingsError("Choose either a style image or a preset, not both.")
        if style is not None:
            limits = self.config.limits
            upload = await fetch_image(
                style, what="style image", max_bytes=limits.max_attachment_bytes,
                max_pixels=limits.max_pixels,
            )  # fmt: skip
            return StyleChoice(upload.data, "your image", None)
        name = preset or self.config.default_preset
        if not name:
            raise SettingsError("Attach a style image or choose a preset (see /styles).")
        found = self.presets.get(name)
        try:
            data = await asyncio.to_thread(found.read_bytes)
        except OSError as exc:
            log.error("Preset %s cannot be read any more: %s", found.name, exc)
            raise SettingsError(f"The preset {found.name!r} is unavailable right now.") from None
        return StyleChoice(data, found.name, found.strength)

    def _settings(
        self,
        chosen: StyleChoice,
        strength: float | None,
        size: int | None,
        colours: str | None,
        keep_faces: float | None = None,
    ) -> Settings:
        given = {
            "strength": strength,
            "size": size,
            "preserve_colors": colours,
            "keep_faces": keep_faces,
        }
        return request_settings(
            "discord",
            {name: value for name, value in given.items() if value is not None},
            base=self.base_settings,
            preset_strength=chosen.strength,
            max_size=self.config.limits.max_size,
            notes={"style": chosen.label},
        )

    # ---- following a job -----------------------------------------------------------------
    @staticmethod
    def _state(status: JobStatus, view: discord.ui.View, requester: str) -> dict[str, Any]:
        embed, files = render(status, requester=requester)
        return {"embed": embed, "files": files, "view": None if status.terminal else view}

    async def _follow(
        self, job: Job, origin: Origin, status: JobStatus, view: discord.ui.View, settings: Settings
    ) -> None:
        """Keep the status message current and deliver the result; never raises."""
        requester = origin.user.mention

        def state() -> dict[str, Any]:
            return self._state(status, view, requester)

        editor = ThrottledEditor(
            origin.edit_status, self.config.limits.status_interval, clock=self.clock,
            sleep=self.sleep,
        )  # fmt: skip
        started: float | None = None
        try:
            async for event in job.events():
                if isinstance(event, Queued):
                    status.state, status.position = "queued", event.position
                elif isinstance(event, Started):
                    status.state, started = "running", self.clock()
                elif isinstance(event, ProgressUpdate):
                    status.state, status.percent, status.eta = "running", event.percent, event.eta
                    status.frame, status.frames = event.frame, event.frames
                elif isinstance(event, Preview):
                    status.preview = event.png
                elif isinstance(event, Done):
                    elapsed = self.clock() - started if started is not None else None
                    await self._deliver(job, event, origin, status, settings, elapsed)
                elif isinstance(event, Failed):
                    status.state, status.message = "failed", event.message
                    log.warning("job %s failed: %s", job.id, event.message)
                elif isinstance(event, JobCancelled):
                    status.state, status.message = "cancelled", event.reason
                if not status.terminal:
                    await editor.update(**state())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: error while following it", job.id)
            status.state, status.message = "failed", CRASH
            if not job.done:
                await job.cancel()
        await editor.final(**state())

    async def _deliver(
        self, job: Job, done: Done, origin: Origin, status: JobStatus, settings: Settings,
        elapsed: float | None,
    ) -> None:  # fmt: skip
        try:
            if done.animated:
                fitted = await asyncio.to_thread(
                    fit_animation_to_limit, done.data, _CLIP_FORMATS[done.mime],
                    origin.upload_limit,
                )  # fmt: skip
            else:
                fitted = await asyncio.to_thread(fit_to_limit, done.png, origin.upload_limit)
        except Exception:
            log.exception(
                "job %s: cannot fit the result into %d bytes", job.id, origin.upload_limit
            )
            status.state = "failed"
            status.message = "The painting is too large to upload here, even made smaller."
            return
        embed = settings_embed(
            settings,
            title="Your painting",
            style_label=status.label,
            fitted=fitted,
            elapsed=elapsed,
            metadata=done.metadata,
            source_frames=done.metadata.get("source_frames"),
        )
        filename = f"pastiche-{job.id}.{fitted.extension}"
        if not fitted.video:  # a video plays as the attachment itself, not in the embed
            embed.set_image(url=f"attachment://{filename}")

        def file() -> discord.File:
            return discord.File(io.BytesIO(fitted.data), filename=filename)

        try:
            await origin.deliver(f"{origin.user.mention} here is your painting!", embed, file)
        except (discord.HTTPException, discord.ClientException) as exc:
            log.error("job %s: could not upload the result: %s", job.id, exc)
            status.state = "failed"
            status.message = f"The painting is ready but I could not upload it to Discord ({exc})."
            return
        status.state, status.message = "done", "Your painting is below."
        log.info("job %s delivered (%s, %d bytes)", job.id, fitted.format, len(fitted.data))


_CLIP_FORMATS = {"image/gif": "gif", "image/webp": "webp", "image/png": "png", "video/mp4": "mp4"}


def describe_job(job: Job) -> str:
    """One line for /queue."""
    label = job.request.label or "your image"
    if job.position is not None:
        return f"`{job.id}` ({label}): waiting, position {job.position}."
    if job.progress is not None:
        frame = job.progress
        where = f" (frame {frame.frame} of {frame.frames})" if frame.frames > 1 else ""
        return f"`{job.id}` ({label}): painting, {job.progress.percent:.0f} % done{where}."
    return f"`{job.id}` ({label}): {job.state.value}."


def _words(text: str) -> list[str]:
    text = re.sub(r"<[@#!&]*\d+>", " ", text)
    return [w for w in re.split(r"[^a-z0-9_-]+", text.lower()) if w]


def _strength_in(text: str) -> float | None:
    match = _STRENGTH.search(text)
    return float(match.group(1)) if match else None

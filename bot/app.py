"""The bot itself: intents, the runner's lifetime, cog and persistent button registration, and
slash-command sync."""

from __future__ import annotations

import logging

import discord
from discord.ext import commands

from core.jobs import Backend, Runner, RunnerConfig
from core.presets import PresetLibrary
from core.settings import Settings

from .cog import PasticheCog
from .config import BotConfig
from .views import CancelButton

log = logging.getLogger(__name__)


def make_intents(config: BotConfig) -> discord.Intents:
    """Only what the bot uses. Messages that mention the bot carry their content and
    attachments without the privileged Message Content intent; it is needed only to read
    images in replied-to messages that do not mention the bot, so it is opt-in."""
    intents = discord.Intents.none()
    intents.guilds = True  # channels, upload limits, slash commands in guilds
    intents.guild_messages = True  # the mention path
    intents.dm_messages = True  # the mention path in DMs
    intents.message_content = config.message_content
    return intents


def runner_config(config: BotConfig) -> RunnerConfig:
    limits = config.limits
    return RunnerConfig(
        workers=config.workers,
        max_queue=limits.max_queue,
        max_per_owner=limits.max_per_user,
        max_pixels=limits.max_pixels,
        job_timeout=limits.job_timeout,
    )


def make_backend(config: BotConfig, runner: RunnerConfig) -> Backend | None:
    """The Celery backend when configured; None lets the runner use local workers."""
    if config.backend != "celery":
        return None
    from core.jobs.celery_backend import CeleryBackend

    if config.engine.weights or config.engine.device != "auto":
        log.info("backend = celery: each worker uses its own weights and device, not [engine]'s")
    return CeleryBackend(runner, config.broker)


class PasticheBot(commands.Bot):
    """commands.Bot with no text commands: slash commands plus the mention listener."""

    def __init__(
        self,
        config: BotConfig,
        presets: PresetLibrary,
        *,
        runner: Runner | None = None,
        base_settings: Settings | None = None,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned, intents=make_intents(config), help_command=None
        )
        self.config = config
        self.presets = presets
        if runner is None:
            settings = runner_config(config)
            runner = Runner(settings, backend=make_backend(config, settings))
        self.runner = runner
        self.base_settings = base_settings

    async def setup_hook(self) -> None:
        await self.runner.start()
        self.add_dynamic_items(CancelButton)  # Cancel works on any status message, ever
        await self.add_cog(
            PasticheCog(
                self, self.runner, self.config, self.presets, base_settings=self.base_settings
            )
        )
        await self.sync_commands()

    async def sync_commands(self) -> list[discord.app_commands.AppCommand]:
        """Sync to the configured guild (instant, for testing) or globally (up to an hour)."""
        if self.config.guild_id:
            guild = discord.Object(id=self.config.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("Synced %d commands to guild %s", len(synced), self.config.guild_id)
        else:
            synced = await self.tree.sync()
            log.info("Synced %d global commands (may take up to an hour to appear)", len(synced))
        return synced

    async def on_message(self, message: discord.Message) -> None:
        """No text commands: the cog's listener handles mentions."""

    async def on_ready(self) -> None:
        log.info(
            "Logged in as %s (%s) in %d guilds",
            self.user,
            getattr(self.user, "id", "?"),
            len(self.guilds),
        )

    async def close(self) -> None:
        """Stop the runner first, so every open status message can still say the job was
        cancelled by the shutdown, then disconnect."""
        try:
            await self.runner.close()
            cog = self.get_cog("Pastiche")
            if isinstance(cog, PasticheCog):
                await cog.drain(timeout=10.0)
        finally:
            await super().close()

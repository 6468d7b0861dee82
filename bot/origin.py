"""Where a request came from (a slash command or a mention) and how to answer it there.

Interaction tokens die 15 minutes after the command; a job can queue and run longer than
that, so once the token is nearly expired (or a followup fails) status and result go to the
channel through the bot's own connection instead.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import discord

from .delivery import upload_limit

log = logging.getLogger(__name__)

TOKEN_TTL = dt.timedelta(minutes=14)
"""Interaction tokens last 15 minutes; stop using one a minute early."""

FileFactory = Callable[[], discord.File]


def _send_kwargs(embed: discord.Embed, files: list[discord.File], view: discord.ui.View | None):
    kwargs: dict[str, Any] = {"embed": embed, "files": files}
    if view is not None:
        kwargs["view"] = view
    return kwargs


class Origin(abc.ABC):
    """Common interface; see the two subclasses."""

    user: Any
    upload_limit: int
    channel: Any

    @abc.abstractmethod
    async def tell(self, text: str) -> None:
        """A short answer only the requester needs to see (ephemeral where possible)."""

    @abc.abstractmethod
    async def post_status(self, embed, files, view) -> None:
        """Post the job's status message (with its Cancel button)."""

    @abc.abstractmethod
    async def edit_status(self, embed, files, view) -> None:
        """Show a new state in the status message."""

    @abc.abstractmethod
    async def deliver(self, content: str, embed: discord.Embed, file: FileFactory) -> None:
        """Upload the result; ``file`` makes a fresh discord.File for each attempt."""

    @property
    def mentions(self) -> discord.AllowedMentions:
        return discord.AllowedMentions(everyone=False, roles=False, users=[self.user])

    async def _channel_send(self, **kwargs: Any) -> Any:
        if self.channel is None:
            raise discord.ClientException("There is no channel to post in.")
        return await self.channel.send(allowed_mentions=self.mentions, **kwargs)


class InteractionOrigin(Origin):
    """A /stylize command: answers through the interaction's followup webhook."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.user = interaction.user
        self.channel = interaction.channel
        self.upload_limit = upload_limit(interaction)
        self._status: Any = None
        self._channel_status: Any = None

    def token_alive(self) -> bool:
        created = self.interaction.created_at
        return discord.utils.utcnow() - created < TOKEN_TTL

    async def tell(self, text: str) -> None:
        if not self.token_alive():
            await self._channel_send(content=f"{self.user.mention} {text}")
            return
        await self.interaction.followup.send(text, ephemeral=True)

    async def post_status(self, embed, files, view) -> None:
        # The first followup replaces the ephemeral "thinking…" message; the status that
        # follows is public so the result and its progress are visible to the channel.
        await self.interaction.followup.send(
            "Got it! Your job is in the queue; its status is below.", ephemeral=True
        )
        self._status = await self.interaction.followup.send(
            wait=True, **_send_kwargs(embed, files, view)
        )

    async def edit_status(self, embed, files, view) -> None:
        if self._channel_status is None and self._status is not None and self.token_alive():
            await self._status.edit(embed=embed, attachments=files, view=view)
            return
        if self._channel_status is None:  # token expired: carry on with a channel message
            self._channel_status = await self._channel_send(**_send_kwargs(embed, files, view))
        else:
            await self._channel_status.edit(embed=embed, attachments=files, view=view)

    async def deliver(self, content: str, embed: discord.Embed, file: FileFactory) -> None:
        if self.token_alive():
            try:
                await self.interaction.followup.send(
                    content, embed=embed, file=file(), allowed_mentions=self.mentions, wait=True
                )
                return
            except discord.HTTPException as exc:
                log.warning("Followup upload failed (%s); posting to the channel instead.", exc)
        await self._channel_send(content=content, embed=embed, file=file())


class MessageOrigin(Origin):
    """A message that mentions the bot: answers are replies to it."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self.user = message.author
        self.channel = message.channel
        self.upload_limit = upload_limit(message)
        self._status: Any = None

    async def tell(self, text: str) -> None:
        await self.message.reply(text, mention_author=False)

    async def post_status(self, embed, files, view) -> None:
        self._status = await self.message.reply(
            mention_author=False, **_send_kwargs(embed, files, view)
        )

    async def edit_status(self, embed, files, view) -> None:
        if self._status is not None:
            await self._status.edit(embed=embed, attachments=files, view=view)

    async def deliver(self, content: str, embed: discord.Embed, file: FileFactory) -> None:
        try:
            await self.message.reply(
                content, embed=embed, file=file(), allowed_mentions=self.mentions
            )
            return
        except discord.HTTPException as exc:  # e.g. the message was deleted meanwhile
            log.warning("Reply with the result failed (%s); posting to the channel instead.", exc)
        await self._channel_send(content=content, embed=embed, file=file())

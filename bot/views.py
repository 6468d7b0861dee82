"""The Cancel button on every status message.

It is a :class:`discord.ui.DynamicItem`: the job id and the requester's user id live in the
button's ``custom_id`` and the class is registered once with ``bot.add_dynamic_items``, so a
click is handled without any in-memory View: past the default 3-minute view timeout and after
the bot restarts.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

import discord

log = logging.getLogger(__name__)

CUSTOM_ID = "pastiche:cancel:{job_id}:{owner_id}"
TEMPLATE = r"pastiche:cancel:(?P<job_id>[A-Za-z0-9_-]{1,40}):(?P<owner_id>[0-9]{1,20})"

NOT_YOURS = "Only the person who asked for this painting can cancel it."
GONE = "That job has already finished (or the bot restarted since), so there is nothing to cancel."
CANCELLING = "Cancelling your job…"


class JobLookup(Protocol):
    def get(self, job_id: str) -> Any: ...


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=TEMPLATE):
    """A persistent Cancel button for one job; only its requester may press it."""

    def __init__(self, job_id: str, owner_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel",
                style=discord.ButtonStyle.danger,
                custom_id=CUSTOM_ID.format(job_id=job_id, owner_id=owner_id),
            )
        )
        self.job_id = job_id
        self.owner_id = owner_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> CancelButton:
        return cls(match["job_id"], int(match["owner_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        runner = getattr(interaction.client, "runner", None)
        await handle_cancel(interaction, runner, self.job_id, self.owner_id)


def cancel_view(job_id: str, owner_id: int) -> discord.ui.View:
    """A View holding the job's Cancel button, to attach to its status message."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id, owner_id))
    return view


async def handle_cancel(
    interaction: discord.Interaction, runner: JobLookup | None, job_id: str, owner_id: int
) -> None:
    """Cancel ``job_id`` if the presser is its requester; every answer is ephemeral."""
    if interaction.user.id != owner_id:
        await interaction.response.send_message(NOT_YOURS, ephemeral=True)
        return
    job = runner.get(job_id) if runner is not None else None
    if job is None or job.done:
        await interaction.response.send_message(GONE, ephemeral=True)
        return
    cancelled = await job.cancel()
    log.info("job %s: cancel by %s -> %s", job_id, owner_id, cancelled)
    await interaction.response.send_message(CANCELLING if cancelled else GONE, ephemeral=True)

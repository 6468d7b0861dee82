"""``pastiche bot`` / ``python -m bot``: load the configuration and presets, then run."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence

import discord

from core.errors import PasticheError
from core.presets import PresetLibrary, load_presets

from .config import TOKEN_ENV, BotConfig, ConfigError, load_config

log = logging.getLogger("bot")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pastiche bot",
        description="Run the Pastiche Discord bot (see docs/BOT.md).",
    )
    parser.add_argument(
        "-c",
        "--config",
        help="TOML configuration file (default: $PASTICHE_BOT_CONFIG or ./pastiche-bot.toml)",
    )
    parser.add_argument("--guild", type=int, help="sync slash commands to this guild only")
    parser.add_argument(
        "--check", action="store_true", help="check the configuration and presets, then exit"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def load_library(config: BotConfig) -> PresetLibrary:
    """Load the presets and log every problem now, so operators see them at start-up."""
    library = load_presets(config.presets)
    if config.presets is None:
        log.info("No presets folder configured; users must attach their own style images.")
    for problem in library.problems:
        log.warning("Preset problem: %s", problem)
    log.info(
        "Loaded %d style preset(s)%s",
        len(library),
        f": {', '.join(sorted(library.presets))}" if library.presets else "",
    )
    if config.default_preset and config.default_preset not in library.presets:
        log.warning("default_preset %r is not among the loaded presets.", config.default_preset)
    return library


async def _run(config: BotConfig, library: PresetLibrary) -> None:
    from .app import PasticheBot  # imports the runner only when actually running

    async with PasticheBot(config, library) as bot:
        await bot.start(config.token or "")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    discord.utils.setup_logging(level=getattr(logging, args.log_level), root=True)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pastiche bot: error: {exc}", file=sys.stderr)
        return 2
    if args.guild:
        config = dataclasses.replace(config, guild_id=args.guild)
    library = load_library(config)
    if args.check:
        return _check(config, library)
    if not config.token:
        print(
            f"pastiche bot: error: no Discord token; set {TOKEN_ENV} or 'token' in the "
            "configuration file.",
            file=sys.stderr,
        )
        return 2
    try:
        asyncio.run(_run(config, library))
    except discord.LoginFailure:
        log.error("Discord rejected the token; check %s or the configuration file.", TOKEN_ENV)
        return 1
    except discord.PrivilegedIntentsRequired:
        log.error(
            "message_content = true needs the Message Content intent enabled for the bot "
            "in the Developer Portal (Bot > Privileged Gateway Intents)."
        )
        return 1
    except PasticheError as exc:  # the broker refused us or is unreachable
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("Stopped.")
    return 0


def _check(config: BotConfig, library: PresetLibrary) -> int:
    """``--check``: the configuration, the presets and, with Celery, the broker."""
    if config.backend == "celery":
        from core.jobs.broker import BrokerError, check, normalise_url, redact

        url = normalise_url(config.broker)
        try:
            check(url)
        except BrokerError as exc:
            print(f"pastiche bot: error: {exc}", file=sys.stderr)
            return 1
        print(f"Broker {redact(url)} answers.")
    print(f"Configuration OK; {len(library)} preset(s), {len(library.problems)} problem(s).")
    return 1 if library.problems else 0


if __name__ == "__main__":
    sys.exit(main())

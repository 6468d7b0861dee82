"""The ``pastiche`` command: stylize images, manage weights, and start the other front ends.

Every :class:`~core.settings.Settings` field is an option of ``pastiche stylize``; the options
are generated from the dataclass (types, defaults, ``Literal`` choices) so the CLI never drifts
from the engine. User mistakes end with ``pastiche: error: <sentence>`` and exit status 2, never
a traceback; Ctrl-C stops the optimiser within one step and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core import __version__, images
from core.errors import Cancelled, ImageError, PasticheError, SettingsError
from core.requests import request_settings
from core.settings import QUALITIES, QUALITY_ITERATIONS, Settings
from core.types import AnimationResult, Progress, Result

PROG = "pastiche"
DISTRIBUTION = "pastiche-paint"
"""The name on the package index (pyproject.toml); ``pastiche`` there is another project."""
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Short help per field; types, defaults and choices come from the dataclass itself.
FIELD_HELP: dict[str, str] = {
    "size": "long side of the output in pixels",
    "iterations": "optimiser steps per scale after the first",
    "initial_iterations": "steps at the first (coarsest) scale (unset: 2 x --iterations)",
    "full_steps_up_to": "scales above this long side get fewer steps, in proportion to 1/side "
    "(0: --iterations at every scale)",
    "optimizer": "optimiser",
    "learning_rate": "Adam step size (ignored by L-BFGS)",
    "lbfgs_history": "L-BFGS memory",
    "content_weight": "weight of the content loss",
    "style_weight": "weight of the style loss",
    "tv_weight": "weight of the total-variation (smoothness) loss",
    "strength": "0 = stay close to the photo, 1 = mostly style",
    "keep_faces": "keep faces recognisable: lowers the strength inside faces by this (0 = off)",
    "content_layers": "comma-separated content layers (unset: the backbone's)",
    "style_layers": "comma-separated style layers (unset: the backbone's)",
    "style_layer_weights": "comma-separated weights, one per style layer",
    "style_depth": "use only the first N style layers (fewer = finer strokes)",
    "style_blend": "how several styles are mixed",
    "style_scale": "style image size relative to the output",
    "init": "what the optimisation starts from",
    "init_image": "image to start from with --init image",
    "seed": "random seed (same seed, same device: same result)",
    "pyramid": "work coarse to fine",
    "min_size": "long side of the first pyramid scale",
    "early_stop": "stop a scale when the loss improves by less than this fraction (0: never)",
    "patience": "steps over which --early-stop is measured",
    "preserve_colors": "keep the photo's colours",
    "backbone": "feature network",
    "weights": "local checkpoint file for the backbone (also $PASTICHE_WEIGHTS)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "precision": "numeric precision of the convolutions (auto: as measured faster here)",
    "channels_last": "channels-last memory layout (unset: where measured faster)",
    "winograd": "Winograd convolutions on CPUs (unset: as measured faster on this machine)",
    "fused_pooling": "fuse each ReLU with the max pool after it (unset: on for the CPU)",
    "preview_every": "with --preview: refresh it every N steps",
    "max_memory": "peak memory of the run, e.g. 2GB or 800MB; scales that need more are painted "
    "in overlapping tiles (auto: half of the free memory)",
    "temporal_weight": "animations: how strongly each frame follows the last (0: paint each alone)",
    "frame_iterations": "animations: steps for each frame after the first (unset: --iterations)",
    "max_frames": "animations: paint at most N frames, evenly spread (unset: every frame)",
}
_SKIP_FIELDS = {"extra"}
_WEIGHT_SUFFIX = re.compile(r"^(?P<path>.+):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
_DISPATCH = {  # command: (module whose main(argv) returns the exit status, pip extra it needs)
    "bot": ("bot.__main__", "bot"),
    "helper": ("core.helper.server", "helper"),
    "worker": ("core.jobs.celery_worker", "celery"),
    "bench": ("benchmarks.bench", None),
}
log = logging.getLogger("pastiche")


# ---- option generation -----------------------------------------------------------------------
def _field_kind(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _list_of(item: type, name: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"--{name} needs a comma-separated list")
        try:
            return tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {item.__name__} list: {text!r}") from None

    parse.__name__ = f"{item.__name__} list"
    return parse


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_settings_options(parser: argparse.ArgumentParser) -> list[str]:
    """One option per Settings field (defaults stay in the dataclass: unset options are simply
    absent from the namespace). Returns the field names added."""
    group = parser.add_argument_group("settings (defaults from core.settings.Settings)")
    hints = typing.get_type_hints(Settings)
    defaults = Settings()
    added = []
    for f in dataclasses.fields(Settings):
        if f.name in _SKIP_FIELDS:
            continue
        kind, optional = _field_kind(hints[f.name])
        default = getattr(defaults, f.name)
        help_text = FIELD_HELP.get(f.name, f.name.replace("_", " "))
        if "(unset:" not in help_text:
            help_text += f" (default: {_show_default(default)})"
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            kw.update(type=_list_of(item, flag[2:]), metavar="A,B,...")
        elif kind in (int, float, str):
            kw["type"] = kind
            kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[kind]
        else:  # a new field type: fail loudly in the tests rather than drop the option
            raise TypeError(f"core.cli cannot map Settings.{f.name}: {kind!r}")
        if f.name in ("weights", "init_image"):
            kw["metavar"] = "PATH"
        group.add_argument(flag, **kw)
        added.append(f.name)
    return added


def parse_style(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]``: only a trailing ``:<number>`` is a weight, and only when the whole
    text is not itself an existing file (``C:\\art\\a.png``, ``night:2.png`` stay paths)."""
    match = _WEIGHT_SUFFIX.match(text)
    if not match or Path(text).exists():
        return text, 1.0
    weight = float(match["weight"])
    if not math.isfinite(weight) or weight <= 0:
        raise SettingsError(
            f"The weight of style '{match['path']}' must be a positive number, got {match['weight']}."
        )
    return match["path"], weight


def build_settings(ns: argparse.Namespace) -> Settings:
    """Settings from the parsed options; --quality sets iterations unless --iterations is given."""
    names = {f.name for f in dataclasses.fields(Settings)} - _SKIP_FIELDS
    given = {k: v for k, v in vars(ns).items() if k in names}
    if getattr(ns, "preview", None) is None:
        given.setdefault("preview_every", 0)  # nobody would see the previews
    return request_settings("cli", given, quality=ns.quality)


# ---- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print full tracebacks and debug logs")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a photo into a painting with neural style transfer.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    st = sub.add_parser(
        "stylize",
        parents=[common],
        help="paint a photo in the style of one or more images",
        description="Paint CONTENT in the style of the --style images.",
        epilog="Example: pastiche stylize me.jpg --style starry.jpg:2 --style scream.jpg -o out.png",
    )
    st.add_argument(
        "content", metavar="CONTENT",
        help=f"the photo ({images.accepted_formats()}), or an animation (animated GIF, WebP or "
        "PNG) or a short video (MP4, MOV, WebM) to paint frame by frame",
    )  # fmt: skip
    st.add_argument(
        "-s", "--style", action="append", required=True, metavar="PATH[:WEIGHT]",
        help="a style image, optionally with a blend weight; repeat for several styles",
    )  # fmt: skip
    st.add_argument(
        "-o", "--output", required=True, metavar="OUT",
        help="output file (.png, .jpg, .webp; for an animation .gif, .webp, .png or .mp4)",
    )  # fmt: skip
    st.add_argument(
        "--quality", choices=QUALITIES, default=None,
        help="iteration budget: " + ", ".join(f"{k}={v}" for k, v in QUALITY_ITERATIONS.items())
        + " (an explicit --iterations wins)",
    )  # fmt: skip
    st.add_argument("--preview", metavar="PATH", help="keep the latest preview image in this file")
    st.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    add_settings_options(st)

    wt = sub.add_parser("weights", parents=[common], help="list, download or verify model weights")
    wsub = wt.add_subparsers(dest="action", metavar="ACTION", required=True)
    wsub.add_parser("list", parents=[common], help="the known weights and whether they are cached")
    dl = wsub.add_parser("download", parents=[common], help="download named weights into the cache")
    dl.add_argument("name", metavar="NAME")
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    vf = wsub.add_parser("verify", parents=[common], help="check a cached or local checkpoint")
    vf.add_argument("target", metavar="NAME_OR_PATH")

    # Front ends parse their own options; these entries exist for --help only (see main()).
    sub.add_parser("bot", help="run the Discord bot (pastiche bot --help)", add_help=False)
    sub.add_parser("helper", help="run the local helper for the GIMP plug-in", add_help=False)
    sub.add_parser(
        "worker",
        help="paint jobs from a Celery broker on this GPU (docs/SCALING.md)",
        add_help=False,
    )
    sub.add_parser("gimp", help="pastiche gimp install: install the GIMP 3 plug-in", add_help=False)
    sub.add_parser("bench", help="run the benchmarks (from a source checkout)", add_help=False)
    return parser


# ---- stylize ---------------------------------------------------------------------------------
class _Interrupt:
    """First Ctrl-C asks the engine to stop after the current step; a second one is immediate."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print(f"\n{PROG}: stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)


class _ProgressBar:
    """tqdm on stderr: steps over all scales, with the scale, loss and the engine's ETA."""

    def __init__(self, enabled: bool, preview: str | None) -> None:
        self.enabled = enabled
        self.preview = preview
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        if self.preview and p.preview is not None:
            images.save_image(p.preview, self.preview)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=p.total_steps, file=sys.stderr, unit="step", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )  # fmt: skip
        if self.bar.total != p.total_steps:
            self.bar.total = p.total_steps
        self.bar.n = p.step
        loss = p.losses.get("total")
        frames = getattr(p, "frames", 1)
        self.bar.set_postfix_str(
            (f"frame {p.frame}/{frames}, " if frames > 1 else "")
            + f"scale {p.scale}/{p.scales} {p.width}x{p.height}"
            + (f" tile {p.tile}/{p.tiles}" if getattr(p, "tiles", 1) > 1 else "")
            + (f", loss {loss:.4g}" if loss is not None else "")
            + (f", ETA {_duration(p.eta)}" if p.eta is not None else ""),
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"


def _is_animation(path: str) -> bool:
    """Whether CONTENT is an animation or a video (unreadable files: load_image says why)."""
    from core.animation import probe_animation

    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return probe_animation(data) is not None


def _load_styles(specs: list[str]) -> list[tuple[Any, float]]:
    styles = []
    for i, spec in enumerate(specs, start=1):
        path, weight = parse_style(spec)
        name = "style image" if len(specs) == 1 else f"style image {i}"
        styles.append((images.load_image(path, name=name), weight))
    return styles


def _check_output(ns: argparse.Namespace, animated: bool) -> None:
    """A typo in -o fails now, not after the painting."""
    if animated:
        from core.animation import format_for_path

        format_for_path(ns.output)
    else:
        images.format_for_path(ns.output)
    out_dir = Path(ns.output).parent
    if not out_dir.is_dir():
        raise ImageError(f"Cannot save '{ns.output}': the folder '{out_dir}' does not exist.")
    if ns.preview:
        images.format_for_path(ns.preview)


def cmd_stylize(ns: argparse.Namespace) -> int:
    settings = build_settings(ns)
    animated = _is_animation(ns.content)
    _check_output(ns, animated)
    # Load (and so check) every input before the model is built, naming the file in errors.
    if animated:
        from core.animation import load_animation

        content: Any = load_animation(ns.content, max_side=settings.size, name="animation")
    else:
        content = images.load_image(ns.content, name="content image")
    styles = _load_styles(ns.style)
    settings = settings.replace(
        extra={
            **settings.extra,
            "content": Path(ns.content).name,
            "styles": [parse_style(s)[0].replace("\\", "/").rsplit("/", 1)[-1] for s in ns.style],
        }
    )

    bar = _ProgressBar(enabled=not ns.quiet, preview=ns.preview)
    start = time.monotonic()
    with _Interrupt() as interrupt:
        try:
            result = _paint(animated, content, styles, settings, bar, interrupt.event.is_set)
        except Cancelled:
            if not interrupt.event.is_set():
                raise
            print(f"{PROG}: interrupted; nothing was saved.", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            bar.close()
    seconds = time.monotonic() - start
    if isinstance(result, AnimationResult):
        from core.animation import save_animation

        save_animation(result.animation, ns.output, metadata=result.metadata)
        (w, h), what = result.animation.size, f", {len(result.animation)} frames"
    else:
        images.save_image(result.image, ns.output, metadata=result.metadata)
        (w, h), what = result.image.size, ""
    for note in result.metadata.get("notes") or ():  # shown even with --quiet: not progress
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if not ns.quiet:
        print(f"Saved {ns.output} ({w}x{h}{what}) in {seconds:.1f} s.", file=sys.stderr)
    return EXIT_OK


def _paint(
    animated: bool,
    content: Any,
    styles: Any,
    settings: Settings,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> Result | AnimationResult:
    """The engine's painter of a still or of an animation (imported here: torch loads late)."""
    if animated:
        from core.engine import stylize_animation

        return stylize_animation(
            content, styles, settings, on_progress=on_progress, should_stop=should_stop
        )
    from core.engine import stylize

    return stylize(content, styles, settings, on_progress=on_progress, should_stop=should_stop)


# ---- weights ---------------------------------------------------------------------------------
def cmd_weights(ns: argparse.Namespace) -> int:
    from core.engine import weights

    if ns.action == "list":
        for row in weights.status():
            mark = "cached" if row.get("present") else "not downloaded"
            size = f", {row['size'] / 1e6:.0f} MB" if row.get("size") else ""
            print(f"{row['name']:<12} {mark}{size}")
            print(f"{'':<12} {row.get('description', '')}")
            print(f"{'':<12} {row.get('path', '')}")
        print(f"Download with `{PROG} weights download NAME`, or pass --weights FILE.")
        return EXIT_OK
    if ns.action == "download":
        path = weights.download(ns.name, progress=not ns.quiet, force=ns.force)
        print(path)
        return EXIT_OK
    ok, message = weights.verify(ns.target)
    print(message, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


# ---- other front ends ------------------------------------------------------------------------
def _dispatch(command: str, module_name: str, extra: str | None, argv: list[str]) -> int:
    if module_name.startswith("benchmarks."):
        _add_repo_root()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            where = "a source checkout" if extra is None else "a complete installation"
            raise PasticheError(
                f"Cannot run `{PROG} {command}`: {module_name} is missing; it comes with {where}."
            ) from None
        hint = f" Install it with: pip install '{DISTRIBUTION}[{extra}]'." if extra else ""
        raise PasticheError(
            f"Cannot run `{PROG} {command}`: it needs the Python package '{missing}'.{hint}"
        ) from None
    code = module.main(argv)
    return EXIT_OK if code is None else int(code)


def _add_repo_root() -> None:
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks").is_dir() and str(root) not in sys.path:
        try:
            importlib.import_module("benchmarks.bench")
        except ModuleNotFoundError:
            sys.path.insert(0, str(root))


def _front_end(argv: list[str]) -> int | None:
    """Run ``bot``/``helper``/``bench``/``gimp install`` with the rest of argv, else None."""
    if not argv:
        return None
    head, rest = argv[0], argv[1:]
    if head in _DISPATCH:
        return _dispatch(head, *_DISPATCH[head], rest)
    if head == "gimp":
        if rest[:1] != ["install"]:
            print(f"usage: {PROG} gimp install [options]", file=sys.stderr)
            print(f"{PROG}: error: the only gimp command is 'install'.", file=sys.stderr)
            return EXIT_USAGE
        return _dispatch("gimp install", "gimp_plugin.install", None, rest[1:])
    return None


# ---- entry point -----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``pastiche``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        front = _front_end(argv)  # they set up their own logging
        if front is not None:
            return front
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING,
            format=f"{PROG}: %(levelname)s: %(message)s" if debug else f"{PROG}: %(message)s",
            stream=sys.stderr,
        )
        ns = build_parser().parse_args(argv)
        if ns.command == "stylize":
            return cmd_stylize(ns)
        return cmd_weights(ns)
    except PasticheError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no raw traceback
        return _report_crash(exc, debug)


def _report_crash(exc: BaseException, debug: bool) -> int:
    text = "".join(traceback.format_exception(exc))
    summary = f"{PROG}: internal error: {type(exc).__name__}: {exc}"
    if debug:
        print(text, file=sys.stderr, end="")
        print(summary, file=sys.stderr)
        return EXIT_FAILED
    try:
        fd, path = tempfile.mkstemp(prefix="pastiche-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{PROG} {__version__}\nargv: {sys.argv!r}\n\n{text}")
        where = f"The traceback was written to {path}"
    except OSError:
        where = "The traceback could not be saved"
    print(f"{summary}\n{where}; rerun with --debug to print it.", file=sys.stderr)
    return EXIT_FAILED

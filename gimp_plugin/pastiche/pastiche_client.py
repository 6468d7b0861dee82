"""The GIMP plug-in's side of the helper protocol: finding (or starting) the helper, HTTP calls,
and progress text. Standard library only and no GIMP imports, so it runs in GIMP's bundled
Python and can be tested on its own.

The helper is found through, in order: the plug-in's arguments, $PASTICHE_HELPER_URL and
$PASTICHE_HELPER_TOKEN, ``helper_url``/``token`` in ``config.json`` (written by
``pastiche gimp install``), and the discovery file the helper writes on start. When none
answers and ``config.json`` names a ``helper_command``, the helper is started with
``--idle-exit`` so it goes away by itself later.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union

PLUGIN_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "config.json"  # not "pastiche.*": GIMP treats that name as the plug-in itself
URL_ENV = "PASTICHE_HELPER_URL"
TOKEN_ENV = "PASTICHE_HELPER_TOKEN"
DISCOVERY_ENV = "PASTICHE_HELPER_FILE"
QUALITIES = ("draft", "standard", "high")
RESOLUTIONS = ("auto", "full", "size")
"""How large the painting is computed: ``full`` at the layer's (or selection's) own size,
``size`` at the Output size and scaled to the layer, ``auto`` full up to the helper's limit."""
DEFAULT_IDLE_EXIT = 900
DEFAULT_START_TIMEOUT = 180.0

Progress = Callable[[float, str], None]
FilePart = tuple[str, bytes, str]  # (filename, data, content type)
Files = Union[dict[str, FilePart], Iterable[tuple[str, FilePart]]]  # noqa: UP007
DEFAULT_FRAME_MS = 100
"""A layer without a "(NNms)" tag in its name shows this long, as in GIMP's GIF export."""


class HelperError(Exception):
    """Something the user should read: ``str()`` is a full sentence."""


# ---- configuration -----------------------------------------------------------------------------
def default_discovery_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the helper writes its URL and token (same rules as core.helper.files)."""
    env = os.environ if environ is None else environ
    if env.get(DISCOVERY_ENV):
        return Path(env[DISCOVERY_ENV]).expanduser()
    if sys.platform == "win32":
        base = env.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "pastiche" / "helper.json"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pastiche" / "helper.json"
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pastiche" / "helper.json"


def load_config(plugin_dir: Path = PLUGIN_DIR) -> dict[str, Any]:
    """The installer's ``config.json`` beside the plug-in ({} when absent)."""
    path = plugin_dir / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise HelperError(
            f"The Pastiche plug-in's settings file {path} is unreadable ({exc}); "
            "run `pastiche gimp install` again."
        ) from None
    return data if isinstance(data, dict) else {}


def read_discovery(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("url") and data.get("token"):
        return data
    return None


# ---- HTTP --------------------------------------------------------------------------------------
def encode_multipart(fields: dict[str, str], files: Files) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type (files: name -> (filename, data, type),
    or (name, (filename, data, type)) pairs where a name repeats, like one part per frame)."""
    boundary = "pastiche-" + uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode("utf-8")
            + b"\r\n"
        )
    for name, (filename, data, ctype) in files.items() if isinstance(files, dict) else files:
        safe = filename.replace('"', "").replace("\r", "").replace("\n", "") or name
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{safe}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class HelperClient:
    """Calls to one helper; every failure becomes a HelperError with the helper's message."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # No proxies: the helper is on loopback and a proxy would not reach it.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.headers.get_content_type(), resp.read()
        except urllib.error.HTTPError as exc:
            raise HelperError(_message_of(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HelperError(
                f"Cannot reach the Pastiche helper at {self.url} ({reason})."
            ) from None

    def json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        _, _, data = self.request(method, path, **kw)
        try:
            out = json.loads(data.decode("utf-8"))
        except ValueError:
            raise HelperError(
                f"The Pastiche helper at {self.url} sent an unreadable answer."
            ) from None
        if not isinstance(out, dict):
            raise HelperError(f"The Pastiche helper at {self.url} sent an unexpected answer.")
        return out

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        return self.json("GET", "/health", timeout=timeout)

    def styles(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/styles").get("styles", []))

    def submit(
        self,
        content_png: bytes,
        *,
        style: bytes | None = None,
        style_name: str = "",
        preset: str = "",
        settings: dict[str, Any] | None = None,
        quality: str | None = None,
        frames: list[bytes] | None = None,
        durations: list[int] | None = None,
    ) -> dict[str, Any]:
        """One picture (``content_png``), or with ``frames`` the PNGs of an animation's frames
        in order (``content_png`` is then ignored) and each one's ``durations`` in ms."""
        fields = {"settings": json.dumps(settings or {})}
        files: list[tuple[str, FilePart]] = []
        if frames:
            files += [("frame", (f"frame-{i}.png", f, "image/png")) for i, f in enumerate(frames)]
            fields["durations"] = json.dumps(durations or [DEFAULT_FRAME_MS] * len(frames))
        else:
            files.append(("content", ("content.png", content_png, "image/png")))
        if style is not None:
            files.append(("style", (style_name or "style", style, "application/octet-stream")))
            fields["style_name"] = style_name
        if preset:
            fields["preset"] = preset
        if quality:
            fields["quality"] = quality
        body, ctype = encode_multipart(fields, files)
        return self.json("POST", "/jobs", body=body, content_type=ctype)

    def status(self, job_id: str) -> dict[str, Any]:
        return self.json("GET", f"/jobs/{job_id}")

    def result(self, job_id: str) -> bytes:
        _, ctype, data = self.request("GET", f"/jobs/{job_id}/result")
        if ctype != "image/png":
            raise HelperError("The Pastiche helper sent something other than a PNG image.")
        return data

    def frames(self, job_id: str) -> tuple[list[bytes], list[int]]:
        """An animation job's painted frames (PNG bytes, in order) and their durations."""
        _, ctype, data = self.request("GET", f"/jobs/{job_id}/frames")
        try:
            if ctype != "application/zip":
                raise ValueError(ctype)
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = sorted(n for n in archive.namelist() if re.fullmatch(r"frame-\d+\.png", n))
                pngs = [archive.read(name) for name in names]
                timing = json.loads(archive.read("animation.json").decode("utf-8"))
            durations = [int(d) for d in timing["durations"]]
        except (ValueError, KeyError, TypeError, zipfile.BadZipFile):
            raise HelperError("The Pastiche helper sent unreadable animation frames.") from None
        if not pngs or len(durations) != len(pngs):
            raise HelperError("The Pastiche helper sent unreadable animation frames.")
        return pngs, durations

    def cancel(self, job_id: str) -> bool:
        return bool(self.json("DELETE", f"/jobs/{job_id}").get("cancelled"))


def _message_of(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read().decode("utf-8"))
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except (ValueError, OSError):
        pass
    return f"The Pastiche helper answered {exc.code} {exc.reason}."


# ---- finding or starting the helper ------------------------------------------------------------
def candidates(
    url: str = "",
    token: str = "",
    config: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[str, str, str]]:
    """(url, token, where it came from) to try. An explicit URL (arguments, then environment,
    then config.json) is used alone; otherwise the discovery file names the running helper."""
    env = os.environ if environ is None else environ
    config = config or {}
    if url:
        tok = token or env.get(TOKEN_ENV, "") or config.get("token", "")
        return [(url, tok, "the helper-url argument")]
    if env.get(URL_ENV):
        return [(env[URL_ENV], env.get(TOKEN_ENV, ""), f"${URL_ENV}")]
    if config.get("helper_url"):
        return [(config["helper_url"], config.get("token", ""), f"helper_url in {CONFIG_NAME}")]
    disc = discovery_file(config, env)
    data = read_discovery(disc)
    return [(str(data["url"]), str(data["token"]), str(disc))] if data else []


def discovery_file(config: dict[str, Any], environ: Mapping[str, str] | None = None) -> Path:
    if config.get("discovery_file"):
        return Path(config["discovery_file"]).expanduser()
    return default_discovery_file(environ)


def connect(
    url: str = "",
    token: str = "",
    config: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    on_wait: Progress | None = None,
) -> HelperClient:
    """A client for a helper that answers /health, starting one if configured to."""
    env = os.environ if environ is None else environ
    config = config or {}
    problem = where = ""
    for cand_url, cand_token, origin in candidates(url, token, config, env):
        client = HelperClient(cand_url, cand_token)
        try:
            client.health(timeout=5)
            return client
        except HelperError as exc:
            problem, where = str(exc), origin
    if url or env.get(URL_ENV) or config.get("helper_url"):
        raise HelperError(
            f"{problem} That address comes from {where}; correct it, or leave it empty so the "
            "plug-in finds the helper by itself."
        )
    if config.get("helper_command"):
        return start_helper(config, env, on_wait=on_wait)
    raise HelperError(
        "The Pastiche helper is not running. Start it with `pastiche helper` (or run "
        "`pastiche gimp install` so that GIMP can start it by itself)."
    )


def start_helper(
    config: dict[str, Any],
    environ: Mapping[str, str] | None = None,
    on_wait: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> HelperClient:
    """Start ``config["helper_command"]`` detached and wait until its /health answers."""
    disc = discovery_file(config, environ)
    command = [str(c) for c in config["helper_command"]]
    command += ["--idle-exit", str(config.get("idle_exit", DEFAULT_IDLE_EXIT))]
    command += ["--discovery-file", str(disc)]
    env = dict(os.environ if environ is None else environ)
    for var in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"):  # GIMP's Python, not the helper's
        env.pop(var, None)
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = 0x00000200 | 0x08000000  # new process group, no window
    else:
        kwargs["start_new_session"] = True  # outlives the plug-in, which GIMP may kill
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            **kwargs,
        )
    except OSError as exc:
        raise HelperError(
            f"Cannot start the Pastiche helper ({' '.join(command[:3])} ...): "
            f"{exc.strerror or exc}. Run `pastiche gimp install` again."
        ) from None
    timeout = float(config.get("start_timeout", DEFAULT_START_TIMEOUT))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_wait:
            on_wait(0.0, "Pastiche: starting the helper (loading the model)…")
        code = proc.poll()
        data = read_discovery(disc)
        if data and (data.get("pid") == proc.pid or code is None):
            client = HelperClient(str(data["url"]), str(data["token"]))
            try:
                client.health(timeout=5)
                return client
            except HelperError:
                pass
        if code is not None:
            raise HelperError(
                f"The Pastiche helper stopped right after starting (exit code {code}). "
                f"Run `{' '.join(command)}` in a terminal to see why."
            )
        sleep(0.25)
    raise HelperError(
        f"The Pastiche helper did not answer within {timeout:g} seconds of starting; "
        "its log file has the details (`pastiche helper --help` shows where it is)."
    )


# ---- running a job -----------------------------------------------------------------------------
def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"about {seconds} s left"
    return f"about {seconds // 60} min {seconds % 60:02d} s left"


def describe(status: dict[str, Any]) -> tuple[float, str]:
    """Progress fraction and text for GIMP's progress bar from a /jobs/{id} answer."""
    state = status.get("state")
    if state == "queued":
        pos = status.get("position")
        where = f" (position {pos})" if pos else ""
        return 0.0, f"Pastiche: waiting in the queue{where}…"
    if state == "running":
        percent = float(status.get("percent") or 0.0)
        eta = format_eta(status.get("eta"))
        frames = int(status.get("frames") or 1)
        where = f" frame {status.get('frame') or 1} of {frames}," if frames > 1 else ""
        return min(1.0, percent / 100.0), f"Pastiche: painting…{where} {percent:.0f}%" + (
            f" ({eta})" if eta else ""
        )
    if state == "done":
        return 1.0, "Pastiche: done"
    return 1.0, f"Pastiche: {state}"


def paint_size(resolution: str, size: int, width: int, height: int, limit: int | None) -> int:
    """The long side to paint ``width`` x ``height`` pixels at (see RESOLUTIONS); ``limit`` is
    the helper's largest size (its /health ``max_size``; None: no limit known)."""
    if resolution not in RESOLUTIONS:
        raise HelperError(f"Unknown resolution {resolution!r}; use {', '.join(RESOLUTIONS)}.")
    own = max(width, height)
    if resolution == "full" or (resolution == "auto" and (limit is None or own <= limit)):
        return own
    return int(size)


def job_settings(
    strength: float, size: int, preserve_colors: bool, keep_faces: float = 0.5
) -> dict[str, Any]:
    """The per-job settings the plug-in sends (names as in core.settings.Settings)."""
    return {
        "strength": float(strength),
        "size": int(size),
        "preserve_colors": "luminance" if preserve_colors else "none",
        "keep_faces": float(keep_faces),
    }


def frame_duration(layer_name: str) -> int:
    """Milliseconds from a GIMP animation layer name ("Frame 3 (80ms) (replace)")."""
    match = re.search(r"\((\d+)\s*ms\)", layer_name)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else DEFAULT_FRAME_MS


def run_job(
    client: HelperClient,
    content_png: bytes,
    *,
    style: bytes | None = None,
    style_name: str = "",
    preset: str = "",
    settings: dict[str, Any] | None = None,
    quality: str | None = None,
    on_progress: Progress | None = None,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bytes, str]:
    """Submit, poll until the end, and return (PNG bytes, style label). Cancels on failure."""
    job = client.submit(
        content_png, style=style, style_name=style_name, preset=preset, settings=settings,
        quality=quality,
    )  # fmt: skip
    fallback = style_name or preset
    return _finish(client, job, client.result, fallback, on_progress, poll, sleep)


def run_animation_job(
    client: HelperClient,
    frames: list[bytes],
    durations: list[int],
    *,
    style: bytes | None = None,
    style_name: str = "",
    preset: str = "",
    settings: dict[str, Any] | None = None,
    quality: str | None = None,
    on_progress: Progress | None = None,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[tuple[list[bytes], list[int]], str]:
    """Paint the frames as one animation (each frame following the last along the motion) and
    return ((painted PNGs, durations), style label). Cancels on failure."""
    job = client.submit(
        b"", style=style, style_name=style_name, preset=preset, settings=settings,
        quality=quality, frames=frames, durations=durations,
    )  # fmt: skip
    fallback = style_name or preset
    return _finish(client, job, client.frames, fallback, on_progress, poll, sleep)


def _finish(
    client: HelperClient,
    job: dict[str, Any],
    fetch: Callable[[str], Any],
    fallback: str,
    on_progress: Progress | None,
    poll: float,
    sleep: Callable[[float], None],
) -> tuple[Any, str]:
    """Poll until the job ends; (its fetched result, style label)."""
    job_id = str(job["id"])
    finished = False
    try:
        while True:
            status = client.status(job_id)
            if on_progress:
                on_progress(*describe(status))
            state = status.get("state")
            if state == "done":
                result = fetch(job_id)
                finished = True
                return result, str(status.get("style") or job.get("style") or fallback)
            if state in ("failed", "cancelled"):
                finished = True
                raise HelperError(str(status.get("error") or f"The job was {state}."))
            sleep(poll)
    finally:
        if not finished:
            try:
                client.cancel(job_id)
            except HelperError:
                pass

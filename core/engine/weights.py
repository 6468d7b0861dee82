"""Pretrained weights: named sources, a verified download into torch's hub cache, and loading.

Files live in ``torch.hub.get_dir()/checkpoints`` under torch hub's own names, so a checkpoint
torchvision already downloaded is reused and ours are reused by torchvision. A download is
hashed while it streams and only renamed into place when the hash matches, so the cache never
holds a file that looks valid but is not. Missing weights are an error, never random weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from core.errors import WeightsError

ENV_VAR = "PASTICHE_WEIGHTS"
"""A checkpoint file used instead of the cache when no explicit path is given."""

HASH_REGEX = re.compile(r"-([a-f0-9]+)\.")  # torch hub: NAME-<sha256 prefix>.EXT
CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds per socket operation, not for the whole download
USER_AGENT = "pastiche"


@dataclass(frozen=True)
class WeightSource:
    """Where a named backbone's weights come from and how its inputs are normalised."""

    name: str
    arch: str  # a key of core.engine.backbones.ARCHITECTURES
    url: str
    filename: str  # the torch hub cache name (the URL's basename)
    sha256_prefix: str  # from the file name, torch hub convention; "" = unchecked
    normalization: str  # "imagenet" (RGB, 0-1, mean/std) or "caffe" (BGR, 0-255 minus mean)
    description: str


def _source(name: str, arch: str, url: str, normalization: str, description: str) -> WeightSource:
    filename = url.rsplit("/", 1)[-1]
    match = HASH_REGEX.search(filename)
    return WeightSource(
        name, arch, url, filename, match.group(1) if match else "", normalization, description
    )


SOURCES: dict[str, WeightSource] = {
    s.name: s
    for s in (
        _source(
            "vgg19",
            "vgg19",
            "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
            "imagenet",
            "VGG19 trained on ImageNet (torchvision IMAGENET1K_V1), about 550 MB; the default.",
        ),
        _source(
            "vgg19-caffe",
            "vgg19",
            "https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth",
            "caffe",
            "VGG19 converted from the original Caffe model, as used by neural-style; "
            "about 550 MB, often crisper, more painterly results.",
        ),
        _source(
            "squeezenet",
            "squeezenet",
            "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
            "imagenet",
            "SqueezeNet 1.1 (torchvision), about 5 MB; fast previews, lower quality.",
        ),
    )
}

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def cache_dir() -> Path:
    """torch hub's checkpoint folder; read on every call so TORCH_HOME changes apply."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(name: str) -> Path:
    return cache_dir() / get_source(name).filename


def get_source(name: str) -> WeightSource:
    try:
        return SOURCES[name]
    except KeyError:
        if name == "random":
            raise WeightsError(
                "The random backbone has no weights file; it is built with seeded random "
                "weights (for tests and benchmarks only)."
            ) from None
        raise WeightsError(
            f"There are no weights named {name!r}; choose one of {', '.join(SOURCES)}."
        ) from None


def _how_to_get(src: WeightSource) -> str:
    return (
        f"Run `pastiche weights download {src.name}` while online, or download {src.url} "
        f"yourself and pass it with --weights FILE (or set {ENV_VAR}=FILE)."
    )


def _explicit(path: str, origin: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise WeightsError(f"The weights file {str(p)!r} given by {origin} {what}.")
    return p


def resolve(
    backbone: str, weights: str | None = None, *, download: bool = True, progress: bool = True
) -> Path:
    """The checkpoint file to use: ``weights``, else $PASTICHE_WEIGHTS, else the cache, else a
    download (when allowed). Raises WeightsError, with the ways to get the file, otherwise."""
    src = get_source(backbone)
    if weights:
        return _explicit(str(weights), "--weights")
    env = os.environ.get(ENV_VAR)
    if env:
        return _explicit(env, f"${ENV_VAR}")
    path = cache_dir() / src.filename
    if path.is_file():
        return path
    if not download:
        raise WeightsError(
            f"The {src.name} weights are not in the cache ({path}) and downloading is off. "
            + _how_to_get(src)
        )
    return _ensure(src, progress=progress, force=False)


def download(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch ``name`` into the cache (a no-op when present unless ``force``) and return its path.

    The file is hashed while it streams into a temporary file next to its final place, then
    renamed over it only if the hash matches; any failure or interrupt removes the temporary
    file, so a broken download can never be mistaken for weights.
    """
    return _ensure(get_source(name), progress=progress, force=force)


def _ensure(src: WeightSource, *, progress: bool, force: bool) -> Path:
    dest = cache_dir() / src.filename
    with _lock_for(dest):
        if dest.is_file() and not force:
            return dest
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WeightsError(
                f"Cannot create the weights cache folder {dest.parent}: {err.strerror or err}."
            ) from err
        _fetch(src, dest, progress)
    return dest


def _lock_for(path: Path) -> threading.Lock:
    """One lock per file, so two workers in one process do not download it twice."""
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def _fetch(src: WeightSource, dest: Path, progress: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(src, out, progress)
        if src.sha256_prefix and not digest.startswith(src.sha256_prefix):
            raise WeightsError(
                f"The download of {src.name} from {src.url} is corrupt: its SHA-256 is "
                f"{digest[:16]}..., expected {src.sha256_prefix}...; nothing was saved. "
                "Try again; if it keeps happening, the file on the server has changed."
            )
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is shared like torch hub's
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _stream(src: WeightSource, out, progress: bool) -> str:
    """Copy the URL's body into ``out``; the body's sha256. Network faults -> WeightsError."""
    sha = hashlib.sha256()
    received = 0
    expected: int | None = None
    request = urllib.request.Request(src.url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=src.filename,
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    sha.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as err:
                        raise WeightsError(
                            f"Cannot save the {src.name} weights in {cache_dir()}: "
                            f"{err.strerror or err}."
                        ) from err
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise _network_error(src, f"the server answered HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _network_error(src, str(err.reason)) from err
    except http.client.IncompleteRead as err:
        raise _network_error(src, _dropped(received + len(err.partial), expected)) from err
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _network_error(src, str(err) or type(err).__name__) from err
    if expected is not None and received != expected:
        raise _network_error(src, _dropped(received, expected))
    return sha.hexdigest()


def _dropped(received: int, expected: int | None) -> str:
    total = f" of {expected}" if expected is not None else ""
    return f"the connection closed after {received}{total} bytes"


def _network_error(src: WeightSource, reason: str) -> WeightsError:
    return WeightsError(
        f"Could not download the {src.name} weights from {src.url} ({reason}); nothing was "
        "saved. " + _how_to_get(src)
    )


def sha256_file(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def verify(name_or_path: str) -> tuple[bool, str]:
    """Re-hash a cached source (by name) or a file (against the hash in its name, if any)."""
    if name_or_path in SOURCES:
        src = SOURCES[name_or_path]
        path = cache_dir() / src.filename
        if not path.is_file():
            return False, f"{src.name}: not downloaded; run `pastiche weights download {src.name}`."
        expected = src.sha256_prefix
        label = src.name
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            return False, f"{path}: no such file."
        match = HASH_REGEX.search(path.name)
        expected = match.group(1) if match else ""
        label = str(path)
    try:
        digest = sha256_file(path)
    except OSError as err:
        return False, f"{label}: cannot read {path}: {err.strerror or err}."
    if not expected:
        try:
            load_state_dict(path)
        except WeightsError as err:
            return False, f"{label}: no hash in its name to check, and {err}"
        return True, f"{label}: loads as a checkpoint (no hash in its name; SHA-256 {digest})."
    if digest.startswith(expected):
        return True, f"{label}: OK ({path}, SHA-256 {digest[:16]}...)."
    hint = f" Run `pastiche weights download {label} --force`." if label in SOURCES else ""
    return False, (
        f"{label}: CORRUPT ({path}, SHA-256 {digest[:16]}..., expected {expected}...)." + hint
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, loaded safely (``weights_only``, no code runs) onto the CPU."""
    p = Path(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise WeightsError(f"The weights file {str(p)!r} does not exist.") from err
    except Exception as err:  # torch raises many types for garbage; all mean "not a checkpoint"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(
            f"{str(p)!r} is not a usable PyTorch checkpoint ({reason[:200]})."
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"{str(p)!r} holds a {type(state).__name__}, not a state dict of tensors."
        )
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{str(p)!r} is a PyTorch file but holds no weight tensors.")
    return tensors


def status() -> list[dict]:
    """One row per source for ``pastiche weights list``."""
    rows = []
    for src in SOURCES.values():
        path = cache_dir() / src.filename
        present = path.is_file()
        rows.append(
            {
                "name": src.name,
                "arch": src.arch,
                "normalization": src.normalization,
                "description": src.description,
                "url": src.url,
                "path": str(path),
                "present": present,
                "size": path.stat().st_size if present else None,
            }
        )
    return rows

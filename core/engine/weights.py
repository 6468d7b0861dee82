"""Pretrained weights: named sources, a verified download into torch's hub cache, and loading.

Files live in ``torch.hub.get_dir()/checkpoints`` under torch hub's own names, so a checkpoint
torchvision already downloaded is reused and ours are reused by torchvision. Downloads are
``torch.hub.download_url_to_file``'s: streamed into a temporary file beside the destination,
hashed on the way, and renamed into place only when the SHA-256 prefix in the file name matches,
so the cache never holds a file that looks valid but is not. This module adds what a user needs
when that fails: a sentence saying what happened and how to get the file another way. Missing
weights are an error, never random weights.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import socket
import threading
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.hub
from tqdm import tqdm

from core.errors import WeightsError

ENV_VAR = "PASTICHE_WEIGHTS"
"""A checkpoint file used instead of the cache when no explicit path is given."""

HASH_REGEX = re.compile(r"-([a-f0-9]+)\.")  # torch hub: NAME-<sha256 prefix>.EXT
CHUNK = 1 << 20  # bytes read at a time when hashing a file
TIMEOUT = 30.0  # seconds per socket operation, not for the whole download
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@dataclass(frozen=True)
class WeightSource:
    """Where a named backbone's weights come from and how its inputs are normalised."""

    name: str
    arch: str  # a key of core.engine.backbones.ARCHITECTURES
    url: str
    filename: str  # the torch hub cache name (the URL's basename)
    sha256_prefix: str  # from the file name (torch hub convention); every download is checked
    normalization: str  # "imagenet" (RGB, 0-1, mean/std) or "caffe" (BGR, 0-255 minus mean)
    description: str


def _source(name: str, arch: str, url: str, normalization: str, description: str) -> WeightSource:
    filename = url.rsplit("/", 1)[-1]
    match = HASH_REGEX.search(filename)
    if match is None:  # a source we could not verify would defeat the cache's promise
        raise ValueError(f"{url} has no SHA-256 prefix in its file name")
    return WeightSource(name, arch, url, filename, match.group(1), normalization, description)


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

_download_lock = threading.Lock()
"""One download at a time in this process: two workers never fetch the same file twice, and
torch.hub's progress bar is ours only while we hold it (see _counting_progress)."""


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
    with _download_lock:
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


@dataclass
class _Tally:
    """Bytes announced (Content-Length) and received, as torch.hub's progress bar saw them."""

    total: int | None = None
    received: int = 0


def _fetch(src: WeightSource, dest: Path, progress: bool) -> None:
    """torch.hub's download, with its failures turned into WeightsErrors a user can act on."""
    tally = _Tally()
    try:
        with _socket_timeout(TIMEOUT), _counting_progress(tally, src.filename):
            torch.hub.download_url_to_file(
                src.url, str(dest), hash_prefix=src.sha256_prefix, progress=progress
            )
    except urllib.error.HTTPError as err:
        raise _network_error(src, f"the server answered HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _network_error(src, str(err.reason)) from err
    except RuntimeError as err:  # torch.hub's hash check; a body cut short fails it too
        if "hash" not in str(err):
            raise
        raise _bad_download(src, tally, str(err)) from err
    except OSError as err:
        raise _os_error(src, err) from err
    except (http.client.HTTPException, ValueError) as err:
        raise _network_error(src, str(err) or type(err).__name__) from err


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens the URL without a timeout, so a stalled server would hang a worker for
    good. Give sockets one while we download (under the lock), unless the program set its own."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _counting_progress(tally: _Tally, label: str) -> Iterator[None]:
    """Let torch.hub's progress bar (its module's ``tqdm``) name the file and count the bytes,
    so a connection that drops midway is reported as such rather than as a bad hash."""
    base: Any = tqdm  # looked up per call, so a test can substitute its own bar

    class CountingBar(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("desc", label)
            kwargs.setdefault("leave", False)
            super().__init__(*args, **kwargs)
            tally.total = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            tally.received += int(n or 0)
            return super().update(n)

    hub: Any = torch.hub  # the attribute is torch's own, not part of its typed API
    previous = hub.tqdm
    hub.tqdm = CountingBar
    try:
        yield
    finally:
        hub.tqdm = previous


def _bad_download(src: WeightSource, tally: _Tally, reason: str) -> WeightsError:
    if tally.total is not None and tally.received < tally.total:
        return _network_error(src, _dropped(tally.received, tally.total))
    got = re.search(r'got "([0-9a-f]+)"', reason)
    digest = f"{got.group(1)[:16]}..." if got else "different"
    return WeightsError(
        f"The download of {src.name} from {src.url} is corrupt: its SHA-256 is {digest}, "
        f"expected {src.sha256_prefix}...; nothing was saved. "
        "Try again; if it keeps happening, the file on the server has changed."
    )


def _os_error(src: WeightSource, err: OSError) -> WeightsError:
    """A full or read-only disk is ours to report; anything else went wrong on the network."""
    if err.errno in _DISK_ERRORS or err.filename is not None:
        return WeightsError(
            f"Cannot save the {src.name} weights in {cache_dir()}: {err.strerror or err}."
        )
    return _network_error(src, str(err) or type(err).__name__)


def _dropped(received: int, expected: int | None) -> str:
    total = f" of {expected}" if expected is not None else ""
    return f"the connection closed after {received}{total} bytes"


def _network_error(src: WeightSource, reason: str) -> WeightsError:
    return WeightsError(
        f"Could not download the {src.name} weights from {src.url} ({reason}); nothing was "
        "saved. " + _how_to_get(src)
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
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


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
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


def status() -> list[dict[str, Any]]:
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

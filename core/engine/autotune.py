"""Precision and convolution path chosen by measuring them on this machine, once.

Why: which path is fastest depends on the machine in ways its CPU flags do not tell. bf16
autocast was 2.5x faster than fp32 per 512 px step on a Xeon with AMX, 1.6x *slower* on a Xeon
with AVX512-BF16 but no AMX, and 1.3x faster on an AMD Zen 4 with the same flags as that Xeon
(docs/BENCHMARKS.md, issue 14). So, as cuDNN's benchmark mode does for its algorithms, the
engine times one forward and backward step of the real network each way at a small size
(``core.engine.speed_probe``), keeps the fastest way that is also accurate enough, and caches the
measurements per machine and torch version in a JSON file next to the weights
(``torch.hub.get_dir()/checkpoints/pastiche-speed.json``, or ``$PASTICHE_SPEED_CACHE``), so
later runs and other processes pay nothing.

The paths are the two settings it decides: precision (fp32 / bf16 autocast) x Winograd
F(4x4, 3x3) convolutions (on the CPU; in bf16 their products run in bf16 too). A setting given
explicitly restricts the choice to the paths that agree with it; when both are given, nothing is
measured. This module holds the policy and the cache; it never times anything itself, so the
policy is tested with a fake clock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "PASTICHE_SPEED_CACHE"
"""Where the measurements are cached instead of next to the weights (a JSON file path)."""
FILE_NAME = "pastiche-speed.json"
PROBE_VERSION = 3
"""Bumped when the probe or its paths change, so older measurements are not reused (2: GPUs
are probed at up to 2048 x 1536 instead of 512 x 384; 3: the probe's style is blurred noise,
so bf16 is no longer rejected for rounding a near-zero style distance)."""

# The accuracy gate, against the fp32 direct-convolution path on the same input. On the probe's
# own inputs (speed_probe.probe_images; 6 seeds at 192 x 144, random VGG19 weights, AMX Xeon),
# bf16 autocast through oneDNN was off by at most 0.2 % on the loss and 6.1 % (relative L2) on
# the input gradient, bf16 Winograd F(2x2, 3x3) by 0.2 % and 6.8 %, fp32 Winograd by < 1e-4 and
# 0.2 %; bf16 through cuDNN on an H200 by 0.2 % and 6.5 % at 512 to 2048 px. The bounds are
# about four times the worst accepted. (Until PROBE_VERSION 3 the probe's style was white noise
# like its image, and bf16 looked 20-90 % off on the gradient, growing with the size: see
# probe_images.) The gate is for paths that are broken on some machine or build, not for
# ranking the accurate ones.
MAX_LOSS_ERROR = 0.02
MAX_GRAD_ERROR = 0.25
# A reduced-precision path must beat the fastest fp32 path by this factor to be chosen: within
# 10 % the two are inside the run-to-run noise of a shared machine, and fp32 gives the exact
# gradient of the loss the user asked for.
PRECISION_MARGIN = 1.10
# Timings taken while other programs held the cores are not trusted for good: a record whose
# timed steps got less than this share of the threads' CPU time is measured again by the next
# process, up to MAX_ATTEMPTS probes in all.
BUSY_SHARE = 0.75
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class SpeedPath:
    """One way of running the network: its precision and whether 3x3 convs use Winograd."""

    precision: str  # "fp32" or "bf16"
    winograd: bool

    @property
    def name(self) -> str:
        return self.precision + ("+winograd" if self.winograd else "")

    @classmethod
    def parse(cls, name: str) -> SpeedPath:
        precision, _, rest = name.partition("+")
        return cls(precision, rest == "winograd")


REFERENCE = SpeedPath("fp32", False)
"""The path every other is compared with for accuracy (plain fp32 convolutions)."""


def paths_for(device_type: str, bf16: bool = True) -> tuple[SpeedPath, ...]:
    """The candidate paths on a device (the reference first). Winograd is for CPUs only: cuDNN
    and MPS choose their own convolution algorithms."""
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    winograd = (False, True) if device_type == "cpu" else (False,)
    return tuple(SpeedPath(p, w) for p in precisions for w in winograd)


@dataclass
class Trial:
    """What the probe measured for one path."""

    path: str
    seconds: float | None = None  # the fastest timed step; None if it was not timed
    loss_error: float | None = None  # relative to the reference path
    grad_error: float | None = None  # relative L2 error of the input gradient
    error: str | None = None  # why the path failed to run, if it did

    @property
    def accurate(self) -> bool:
        return (
            self.error is None
            and self.loss_error is not None
            and self.grad_error is not None
            and self.loss_error <= MAX_LOSS_ERROR
            and self.grad_error <= MAX_GRAD_ERROR
        )

    @property
    def usable(self) -> bool:
        return self.accurate and self.seconds is not None

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.path} failed ({self.error})"
        acc = ""
        if self.loss_error is not None and self.grad_error is not None:
            acc = f", loss {self.loss_error:.1e} / gradient {self.grad_error:.1e} off"
        if not self.accurate:
            return f"{self.path} rejected as inaccurate{acc}"
        return f"{self.path} {self.seconds:.3f} s{acc}"


@dataclass
class Record:
    """One machine's measurements, as cached."""

    key: dict[str, Any]
    trials: list[Trial]
    probe_seconds: float
    measured_at: str
    load: str = ""
    size: list[int] = field(default_factory=list)
    cpu_share: float | None = None  # see speed_probe.ProbeNetwork.cpu_share
    attempts: int = 1  # probes so far on a busy machine (see ``settled``)

    @property
    def busy(self) -> bool:
        return self.cpu_share is not None and self.cpu_share < BUSY_SHARE

    @property
    def settled(self) -> bool:
        """Whether later processes should use it: measured on a quiet machine, or busy every
        time it was tried (then measuring again would cost each process its probe for no gain)."""
        return not self.busy or self.attempts >= MAX_ATTEMPTS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        trials = [Trial(**t) for t in data["trials"]]
        return cls(
            key=dict(data["key"]),
            trials=trials,
            probe_seconds=float(data["probe_seconds"]),
            measured_at=str(data.get("measured_at", "")),
            load=str(data.get("load", "")),
            size=list(data.get("size", [])),
            cpu_share=data.get("cpu_share"),
            attempts=int(data.get("attempts", 1)),
        )


@dataclass(frozen=True)
class Choice:
    """The path the engine runs, and why (for the output's metadata and ``pastiche bench``)."""

    precision: str
    winograd: bool
    reason: str  # "forced", "measured", "cached from <file>", or why nothing was measured
    trials: tuple[Trial, ...] = ()

    @property
    def path(self) -> SpeedPath:
        return SpeedPath(self.precision, self.winograd)

    @property
    def dtype(self) -> Any:
        """The autocast dtype (``torch.bfloat16``), or None for fp32."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else None

    def describe(self) -> str:
        text = f"{self.path.name} ({self.reason})"
        if self.trials:
            text += ": " + "; ".join(t.describe() for t in self.trials)
        return text

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path.name, "reason": self.reason}
        if self.trials:
            out["measured"] = {
                t.path: (round(t.seconds, 4) if t.usable and t.seconds is not None else None)
                for t in self.trials
            }
        return out


# ---- the policy -----------------------------------------------------------------------------
def allowed(path: SpeedPath, precision: str, winograd: bool | None) -> bool:
    """Whether ``path`` agrees with the settings (``auto`` / None leave the axis open)."""
    return (precision == "auto" or path.precision == precision) and (
        winograd is None or path.winograd == winograd
    )


def pick(trials: Sequence[Trial], precision: str, winograd: bool | None) -> SpeedPath | None:
    """The fastest accurate measured path the settings allow; reduced precision only when it
    beats the fastest allowed fp32 path by ``PRECISION_MARGIN``. None if none qualifies."""
    usable = [
        (t.seconds, SpeedPath.parse(t.path))
        for t in trials
        if t.usable
        and t.seconds is not None
        and allowed(SpeedPath.parse(t.path), precision, winograd)
    ]
    if not usable:
        return None
    fastest = min(usable, key=lambda item: item[0])
    exact = [item for item in usable if item[1].precision == "fp32"]
    if fastest[1].precision != "fp32" and exact:
        best_exact = min(exact, key=lambda item: item[0])
        if fastest[0] * PRECISION_MARGIN > best_exact[0]:
            return best_exact[1]
    return fastest[1]


# ---- the cache ------------------------------------------------------------------------------
def cache_file() -> Path:
    """``$PASTICHE_SPEED_CACHE``, else next to the downloaded weights (torch hub's folder)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    from core.engine import weights

    return weights.cache_dir() / FILE_NAME


@functools.cache
def _cpu_model() -> tuple[str, str]:
    """The CPU's model name and a short digest of its feature flags (for the key only)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                name = {"Features": "flags", "Model": "model name"}.get(name.strip(), name.strip())
                if name in ("model name", "flags"):
                    found.setdefault(name, value.strip())
    except OSError:
        pass
    model = found.get("model name") or platform.processor() or platform.machine()
    flags = found.get("flags", "")
    return model, hashlib.sha1(flags.encode()).hexdigest()[:12] if flags else ""


def machine_key(device: Any) -> dict[str, Any]:
    """What the measurements depend on: the device, the CPU, the threads, torch, and the
    oneDNN/ATen ISA caps of the environment (so an emulated older CPU is measured anew)."""
    import torch

    cpu, flags = _cpu_model()
    key: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "probe": PROBE_VERSION,
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        if os.environ.get(var):
            key[var] = os.environ[var]
    return key


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_record(path: Path, key: dict[str, Any]) -> Record | None:
    entry = _read(path).get(key_id(key))
    if not isinstance(entry, dict):
        return None
    try:
        record = Record.from_json(entry)
    except (KeyError, TypeError, ValueError):
        return None
    return record if record.key == key else None


def store_record(path: Path, record: Record) -> None:
    """Add ``record`` to the file (atomically: other processes read it concurrently)."""
    data = _read(path)
    data[key_id(record.key)] = record.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One prober per machine at a time: two workers starting together would otherwise both
    probe, and each would time the other's load."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst a second probe
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- deciding -------------------------------------------------------------------------------
Prober = Callable[[Any, Sequence[SpeedPath]], Record]
"""Measures the paths on a device and returns the record (``core.engine.speed_probe.measure``)."""

_memo: dict[str, tuple[Record, str]] = {}
_memo_lock = threading.Lock()


def measurements(device: Any, prober: Prober | None = None) -> tuple[Record, str]:
    """This machine's record and where it came from ("measured" or "cached from <file>"):
    from this process's memory, else the cache file, else by probing (and caching) now."""
    key = machine_key(device)
    kid = key_id(key)
    with _memo_lock:
        if kid not in _memo:
            _memo[kid] = _cached_or_probed(device, key, prober)
        return _memo[kid]


def _cached_or_probed(
    device: Any, key: dict[str, Any], prober: Prober | None
) -> tuple[Record, str]:
    path = cache_file()
    found = load_record(path, key)
    if found is not None and found.settled:
        return found, f"cached from {path}"
    with _file_lock(path):
        found = load_record(path, key)  # another process may have just probed
        if found is not None and found.settled:
            return found, f"cached from {path}"
        record = _probe(device, key, prober)
        if found is not None:
            record = merged(found, record) if record.busy else record
            record.attempts = found.attempts + 1
        try:
            store_record(path, record)
        except OSError as exc:
            log.warning("could not cache the speed measurements in %s: %s", path, exc)
    return record, "measured" + (" on a busy machine" if record.busy else "")


def _probe(device: Any, key: dict[str, Any], prober: Prober | None) -> Record:
    if prober is None:
        from core.engine import speed_probe

        prober = speed_probe.measure
    started = time.perf_counter()
    record = prober(device, probe_paths(device))
    record.key = key
    log.info(
        "speed probe (%.1f s): %s",
        time.perf_counter() - started,
        "; ".join(t.describe() for t in record.trials),
    )
    return record


def merged(earlier: Record, busy: Record) -> Record:
    """A busy probe combined with the earlier one it repeats: each path keeps its fastest
    step of the two. Other programs only ever add time, so per-path minima come closer to the
    quiet machine's figures than either probe alone; keeping only the last busy probe once
    the attempts ran out left one machine here on fp32, measured 3.4x slower a step than bf16
    when quiet, for good."""
    before = {t.path: t for t in earlier.trials}
    trials = []
    for trial in busy.trials:
        old = before.get(trial.path)
        if old is not None and old.usable and trial.usable:
            assert old.seconds is not None and trial.seconds is not None
            trial = replace(trial, seconds=min(old.seconds, trial.seconds))
        trials.append(trial)
    return replace(busy, trials=trials)


def probe_paths(device: Any) -> tuple[SpeedPath, ...]:
    """The candidates on ``device`` (bf16 only where autocast can run it)."""
    import torch

    bf16 = True
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    return paths_for(device.type, bf16)


def choose(
    precision: str, winograd: bool | None, device: Any, prober: Prober | None = None
) -> Choice:
    """The path for these settings on ``device``: forced when both settings are given, else
    the fastest accurate measured path among those the settings allow."""
    if precision != "auto" and winograd is not None:
        return Choice(precision, winograd, "forced")
    record, origin = measurements(device, prober)
    found = pick(record.trials, precision, winograd)
    trials = tuple(record.trials)
    if found is None:  # nothing allowed ran accurately: the plain path always works
        fallback = SpeedPath(
            "fp32" if precision == "auto" else precision, bool(winograd) and device.type == "cpu"
        )
        return Choice(
            fallback.precision, fallback.winograd, f"no allowed path measured; {origin}", trials
        )
    forced = [
        n for n, v in (("precision", precision != "auto"), ("winograd", winograd is not None)) if v
    ]
    reason = origin + (f", {' and '.join(forced)} forced" if forced else "")
    return Choice(found.precision, found.winograd, reason, trials)


def forget() -> None:
    """Drop this process's memory of the measurements (tests; a changed thread count)."""
    with _memo_lock:
        _memo.clear()

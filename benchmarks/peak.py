"""Peak RSS of a command as the kernel counts it, free of the measuring process's own memory.

A child's ``ru_maxrss`` from ``wait4`` starts at its parent's RSS when it forks (the child is a
copy until it execs), so a benchmark or a pytest process that has imported torch (0.2-1.4 GB)
would add itself to every figure. A tiny launcher that imports nothing forks the command
instead, and reports its child's peak on stderr; the tests and the benchmarks share it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print("PEAK_KB", usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class Measured:
    """One finished ``python <args>`` process: exit code, output, wall and CPU time, peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float
    peak_bytes: int


def run_python(args: Sequence[str], **popen: Any) -> Measured:
    """Run ``python <args>`` (e.g. ``["-m", "core", "stylize", ...]``) and measure its peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, **popen
    )
    wall = time.perf_counter() - started
    stderr, _, report = proc.stderr.rpartition("PEAK_KB")
    kib, cpu = report.split()[:2] if report else ("0", "0")
    factor = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return Measured(proc.returncode, proc.stdout, stderr if report else proc.stderr, wall,
                    float(cpu), int(kib) * factor)  # fmt: skip

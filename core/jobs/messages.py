"""What crosses the pipes between the local backend and a worker process.

A worker sends the job events themselves (``Started``, ``ProgressUpdate``, ``Preview``, ``Done``,
``Failed``, ``JobCancelled`` from :mod:`core.jobs.events`: frozen, picklable dataclasses), so a
field added to an event reaches the runner without touching this boundary. The few messages
here are the pipes' own: a job to run, the worker being ready, a log line, a bug's traceback,
and (posted by the parent itself) the process having exited. Everything is plain data: the
parent must be able to unpickle it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.jobs.events import (
    Done,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Started,
)


class SharedInt(Protocol):
    """A ``multiprocessing`` shared integer (``RawValue("q")``) as both sides use it."""

    value: int


# ---- parent -> worker ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    """Run ``request`` as job ``job_id``. The parent stops it by writing ``seq`` (unique per
    backend) into the worker's shared cancel value, which the engine reads once per step."""

    seq: int
    job_id: str
    request: JobRequest


@dataclass(frozen=True)
class StopWorker:
    """Finish and exit (sent when the backend closes)."""


ToWorker = RunJob | StopWorker


# ---- worker -> parent ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The engine is imported (and warmed up, if asked): jobs start without delay now."""

    pid: int


@dataclass(frozen=True)
class Log:
    """A line for the operator's log, at ``level`` (a ``logging`` level)."""

    level: int
    text: str


@dataclass(frozen=True)
class Crashed:
    """The job raised something that is not a PasticheError: a bug. The traceback goes to the
    operator's log; the user gets a generic sentence."""

    job_id: str
    traceback: str


@dataclass(frozen=True)
class Exited:
    """Posted by the parent's reader thread, never sent by a worker: the process has ended."""

    exitcode: int | None


JobMessage = Started | ProgressUpdate | Preview | Done | Failed | JobCancelled | Crashed
"""Everything a worker says about one job, in the order it happens."""
FromWorker = Ready | Log | JobMessage

"""The job runner, torch-free: what a job is and what happens to it (``events``), the queue and
its limits (``runner``), the boundary to what runs the engine (``backend``), the local process
pool (``local``) and the body of a worker process (``worker``).

Front ends import from here: ``from core.jobs import Runner, RunnerConfig, JobRequest, Done``.
"""

from core.jobs.backend import Backend, CancelToken
from core.jobs.events import (
    TERMINAL_EVENTS,
    Done,
    Event,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Queued,
    Started,
    TerminalEvent,
)
from core.jobs.runner import Job, JobState, Runner, RunnerConfig

__all__ = [
    "TERMINAL_EVENTS",
    "Backend",
    "CancelToken",
    "Done",
    "Event",
    "Failed",
    "Job",
    "JobCancelled",
    "JobRequest",
    "JobState",
    "Preview",
    "ProgressUpdate",
    "Queued",
    "Runner",
    "RunnerConfig",
    "Started",
    "TerminalEvent",
]

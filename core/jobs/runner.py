"""The job runner shared by the Discord bot and the GIMP helper.

``Runner.submit()`` checks the limits at once (queue length, jobs per owner, pixels read from
the image headers), queues the job FIFO and hands it to a :class:`~core.jobs.backend.Backend` when a
slot is free. Each :class:`Job` records its events and replays them to any number of
``job.events()`` readers. The runner lives in the event loop's process and never imports torch:
the engine runs in worker processes behind the backend (``core.jobs.local``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

from PIL import Image

from core.errors import BusyError, LimitError
from core.images import MAX_PIXELS
from core.jobs.backend import GENERIC_FAILURE, Backend, CancelToken
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
from core.settings import Settings

log = logging.getLogger(__name__)

START_FAILURE = "The painting engine could not start in time; please try again later."
CANCEL_REASONS = {
    "user": "The job was cancelled.",
    "shutdown": "The service shut down before the job could finish.",
}
_KEEP_FINISHED = 1000  # finished jobs remembered for get()


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_FINAL_STATE = {Done: JobState.DONE, Failed: JobState.FAILED, JobCancelled: JobState.CANCELLED}


@dataclass
class RunnerConfig:
    """Operator settings of the runner (the bot and the helper read them from their config)."""

    workers: int = 1
    """Worker processes, each with its own warm model (one per GPU or a few per big CPU)."""
    max_queue: int = 20
    """Jobs waiting (not counting running ones); a full queue rejects new jobs at once."""
    max_per_owner: int = 2
    """Jobs one owner (Discord user, GIMP session) may have queued or running."""
    max_pixels: int = MAX_PIXELS
    """Largest accepted input (content or style) in pixels, read from the image header."""
    job_timeout: float = 900.0
    """Seconds a job may run before it is stopped and fails."""
    warmup: Settings | None = None
    """If set, each worker paints a tiny image with these settings before taking jobs."""
    engine: str = "core.engine:stylize"
    """``module:function`` the workers call; tests plug fake engines in here."""
    stop_grace: float = 10.0
    """Seconds a cancelled or timed-out job gets to stop before its worker is killed."""
    start_timeout: float = 120.0
    """How long ``start()`` waits for the workers to be ready (then carries on anyway), and how
    long a dispatched job may wait for its worker to begin."""
    threads: int | None = None
    """Torch CPU threads per worker; None = torch's default for one worker, else the CPU
    cores shared out between the workers (they would otherwise oversubscribe the CPU)."""

    def __post_init__(self) -> None:
        for name in ("workers", "max_queue", "max_per_owner", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RunnerConfig.{name} must be a whole number >= 1, got {value!r}.")
        for name in ("job_timeout", "stop_grace", "start_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RunnerConfig.{name} must be a positive number of seconds.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError("RunnerConfig.threads must be a whole number >= 1 or None.")
        if ":" not in self.engine:
            raise ValueError('RunnerConfig.engine must look like "module:function".')


class Job:
    """One accepted request: its state, its latest progress and the events so far."""

    def __init__(self, runner: Runner, job_id: str, owner: str, request: JobRequest) -> None:
        self.id = job_id
        self.owner = owner
        self.request = request
        self.state = JobState.QUEUED
        self.created = time.time()
        self.progress: ProgressUpdate | None = None
        self.result: Done | None = None
        self.error: str | None = None
        self._runner = runner
        self._history: list[Event] = []
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._terminal: asyncio.Future[TerminalEvent] = asyncio.get_running_loop().create_future()
        self._token: CancelToken | None = None
        self._last_position: int | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"<Job {self.id} owner={self.owner!r} {self.state.value}>"

    @property
    def position(self) -> int | None:
        """1-based place in the queue while queued (1 = next), else None."""
        return self._runner._position(self)

    @property
    def done(self) -> bool:
        return self._terminal.done()

    async def events(self) -> AsyncIterator[Event]:
        """Past events (the latest Queued/ProgressUpdate/Preview of each kind), then live ones;
        ends after the terminal event."""
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        for event in self._history:
            inbox.put_nowait(event)
        if not self.done:
            self._subscribers.add(inbox)
        try:
            while True:
                event = await inbox.get()
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            self._subscribers.discard(inbox)

    async def wait(self) -> TerminalEvent:
        """The terminal event (Done, Failed or JobCancelled)."""
        return await asyncio.shield(self._terminal)

    async def cancel(self) -> bool:
        """Queued: removed at once. Running: asked to stop (within one optimiser step); await
        ``wait()`` for the JobCancelled. False if the job had already ended."""
        return self._runner._cancel(self, "user")

    def _emit(self, event: Event) -> None:
        if self.done:
            return
        if isinstance(event, ProgressUpdate):
            self.progress = event
        elif isinstance(event, Queued):
            self._last_position = event.position
        if isinstance(event, (Queued, ProgressUpdate, Preview)):
            # Keep replay short: only the latest event of these kinds is worth replaying.
            kind = type(event)
            self._history = [e for e in self._history if type(e) is not kind]
        self._history.append(event)
        for inbox in self._subscribers:
            inbox.put_nowait(event)
        if isinstance(event, TERMINAL_EVENTS):
            self.state = _FINAL_STATE[type(event)]
            if isinstance(event, Done):
                self.result = event
            elif isinstance(event, Failed):
                self.error = event.message
            self._subscribers.clear()
            self._terminal.set_result(event)


class Runner:
    """FIFO queue with limits in front of a Backend; use as ``async with Runner(cfg) as r``."""

    def __init__(self, config: RunnerConfig | None = None, backend: Backend | None = None) -> None:
        self.config = config or RunnerConfig()
        if backend is None:
            from core.jobs.local import LocalBackend

            backend = LocalBackend(self.config)
        self.backend = backend
        self._queue: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing = False
        self._closed = False

    async def __aenter__(self) -> Runner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backend (workers load the model and warm up); idempotent."""
        if self._closing:
            raise RuntimeError("This runner has been closed; make a new one.")
        if not self._started:
            self._started = True
            await self.backend.start()
            self._pump()

    async def close(self) -> None:
        """Cancel queued and running jobs (each gets its terminal event), then stop the backend."""
        if self._closing:
            while not self._closed:
                await asyncio.sleep(0.05)
            return
        self._closing = True
        try:
            while self._queue:
                self._cancel(self._queue[-1], "shutdown")
            for job in list(self._running.values()):
                assert job._token is not None
                job._token.cancel("shutdown")
            if self._tasks:
                # The backend kills a worker that does not stop within stop_grace.
                await asyncio.wait(set(self._tasks), timeout=self.config.stop_grace + 15)
            for task in list(self._tasks):
                task.cancel()
            for job in list(self._running.values()):
                job._emit(JobCancelled(job.id, CANCEL_REASONS["shutdown"]))
            self._running.clear()
            if self._started:
                await self.backend.close()
        finally:
            self._closed = True

    # ---- submitting and looking up -----------------------------------------------------------
    async def submit(self, request: JobRequest, owner: str) -> Job:
        """Queue a job or raise at once: BusyError (queue full, owner limit), LimitError
        (pixels). A job accepted here always ends with exactly one terminal event."""
        if self._closing:
            raise BusyError("The service is shutting down; please try again later.")
        if not self._started:
            await self.start()
        owner = str(owner)
        self._check_pixels(request)
        mine = len(self.jobs_of(owner))
        if mine >= self.config.max_per_owner:
            limit = self.config.max_per_owner
            raise BusyError(
                f"You already have {mine} job{'s' if mine != 1 else ''} queued or running "
                f"(the limit is {limit}); wait for one to finish or cancel it."
            )
        if len(self._queue) >= self.config.max_queue:
            raise BusyError(
                f"The queue is full ({self.config.max_queue} jobs waiting); "
                "please try again in a few minutes."
            )
        job = Job(self, uuid.uuid4().hex[:12], owner, request)
        self._queue.append(job)
        job._emit(Queued(job.id, len(self._queue)))
        log.info("job %s queued for %s at position %d", job.id, owner, len(self._queue))
        self._pump()
        return job

    def get(self, job_id: str) -> Job | None:
        """A queued, running or recently finished job."""
        if job_id in self._running:
            return self._running[job_id]
        for job in self._queue:
            if job.id == job_id:
                return job
        return self._finished.get(job_id)

    def jobs_of(self, owner: str) -> list[Job]:
        """The owner's queued and running jobs, running first."""
        owner = str(owner)
        return [j for j in (*self._running.values(), *self._queue) if j.owner == owner]

    @property
    def queue_length(self) -> int:
        """Jobs waiting to start."""
        return len(self._queue)

    @property
    def running(self) -> list[Job]:
        return list(self._running.values())

    # ---- internals ---------------------------------------------------------------------------
    def _position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        try:
            return self._queue.index(job) + 1
        except ValueError:
            return None

    def _check_pixels(self, request: JobRequest) -> None:
        names = ["content"] + [
            "style" if len(request.styles) == 1 else f"style {i}"
            for i in range(1, len(request.styles) + 1)
        ]
        datas = [request.content] + [data for data, _ in request.styles]
        limit = self.config.max_pixels
        for name, data in zip(names, datas, strict=True):
            size = _header_size(data)
            if size is None:
                continue  # not readable here: the worker reports the image error properly
            width, height = size
            if width * height > limit:
                raise LimitError(
                    f"The {name} image is {width}x{height} pixels "
                    f"({width * height / 1e6:.1f} megapixels); the limit is "
                    f"{limit / 1e6:.1f} megapixels. Please send a smaller image."
                )

    def _announce_positions(self) -> None:
        for index, job in enumerate(self._queue):
            if job._last_position != index + 1:
                job._emit(Queued(job.id, index + 1))

    def _pump(self) -> None:
        """Start queued jobs while the backend has free slots."""
        if not self._started or self._closing:
            return
        moved = False
        while self._queue and len(self._running) < self.backend.capacity:
            job = self._queue.popleft()
            moved = True
            job.state = JobState.RUNNING
            job._token = CancelToken()
            self._running[job.id] = job
            task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if moved:
            self._announce_positions()

    async def _run(self, job: Job) -> None:
        token = job._token
        assert token is not None
        loop = asyncio.get_running_loop()
        # The time limit counts from Started: a worker being (re)spawned does not eat into it,
        # but one that never gets going is bounded by start_timeout.
        timer = loop.call_later(self.config.start_timeout, token.cancel, "start_timeout")

        def relay(event: Event) -> None:
            """What the backend may emit while a job runs: Started, progress, previews."""
            nonlocal timer
            if job.done or event.job_id != job.id:
                return
            if isinstance(event, (Started, ProgressUpdate, Preview)) and not job._started:
                job._started = True
                job._emit(Started(job.id))
                timer.cancel()
                timer = loop.call_later(self.config.job_timeout, token.cancel, "timeout")
                log.info("job %s started", job.id)
            if isinstance(event, (ProgressUpdate, Preview)):
                job._emit(event)

        try:
            terminal = await self.backend.run(job.id, job.request, relay, token)
            if not isinstance(terminal, TERMINAL_EVENTS):
                raise TypeError(f"backend returned {terminal!r}, not a terminal event")
        except asyncio.CancelledError:
            job._emit(JobCancelled(job.id, CANCEL_REASONS["shutdown"]))
            self._finish(job)
            raise
        except Exception:
            log.exception("job %s: the backend failed", job.id)
            terminal = Failed(job.id, GENERIC_FAILURE)
        finally:
            timer.cancel()
        if isinstance(terminal, JobCancelled):
            if token.reason == "timeout":
                terminal = Failed(job.id, _timeout_message(self.config.job_timeout))
            elif token.reason == "start_timeout":
                terminal = Failed(job.id, START_FAILURE)
            else:
                terminal = JobCancelled(job.id, CANCEL_REASONS.get(token.reason or "user", ""))
        elif terminal.job_id != job.id:
            terminal = Failed(job.id, GENERIC_FAILURE)
        log.info("job %s ended: %s", job.id, type(terminal).__name__)
        job._emit(terminal)
        self._finish(job)
        self._pump()

    def _finish(self, job: Job) -> None:
        self._running.pop(job.id, None)
        self._finished[job.id] = job
        while len(self._finished) > _KEEP_FINISHED:
            self._finished.popitem(last=False)

    def _cancel(self, job: Job, reason: str) -> bool:
        if job.done:
            return False
        if job.state is JobState.QUEUED:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            job._emit(JobCancelled(job.id, CANCEL_REASONS[reason]))
            self._finish(job)
            self._announce_positions()
            return True
        assert job._token is not None
        job._token.cancel(reason)
        return True


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image header (no full decode), None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError:
        raise LimitError(
            "An image is far too large (a decompression bomb?); please send a smaller image."
        ) from None
    except Exception:
        return None


def _timeout_message(seconds: float) -> str:
    if seconds >= 120:
        limit = f"{seconds / 60:g} minutes"
    else:
        limit = f"{seconds:g} second{'s' if seconds != 1 else ''}"
    return (
        f"The job took too long (over {limit}) and was stopped. "
        "Try a smaller size or fewer iterations."
    )

"""The local Backend: a pool of spawned worker processes, one job at a time each.

Each worker (``core.jobs.worker.main``) keeps its model warm between jobs. A reader thread per worker
waits on its event pipe and its process sentinel and hands every message to the event loop with
``call_soon_threadsafe``, so nothing here blocks the loop (sending a job, which may be a few MB
of image bytes, also happens in a thread). A worker that dies is noticed at once through its
sentinel: its job fails with a clear message and a new worker takes its slot.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import multiprocessing
import os
import threading
from multiprocessing.connection import wait as wait_any
from typing import TYPE_CHECKING

from core.jobs import worker as worker_module
from core.jobs.backend import GENERIC_FAILURE, CancelToken, Emit
from core.jobs.events import (
    Done,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Started,
    TerminalEvent,
)
from core.jobs.messages import (
    Crashed,
    Exited,
    FromWorker,
    JobMessage,
    Log,
    Ready,
    RunJob,
    StopWorker,
    ToWorker,
)

if TYPE_CHECKING:
    from core.jobs.runner import RunnerConfig

log = logging.getLogger(__name__)

CRASH_MESSAGE = (
    "The painting engine stopped unexpectedly while working on this job (it may have run out "
    "of memory). Please try again, perhaps with a smaller size."
)
_SPAWN = multiprocessing.get_context("spawn")  # never fork: the parent may hold threads/locks
_BACKOFF_MAX = 30.0
_EXIT_TIMEOUT = 10.0  # an idle worker asked to exit (interpreter teardown with torch loaded)


class _Worker:
    """One worker process, its two pipes, and the thread relaying its messages to the loop."""

    def __init__(self, slot: int, config: RunnerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.slot = slot
        self.loop = loop
        child_tasks, self.tasks = _SPAWN.Pipe(duplex=False)  # (receiving end, sending end)
        self.events, child_events = _SPAWN.Pipe(duplex=False)
        self._child_ends = (child_tasks, child_events)
        self.cancel_seq = _SPAWN.RawValue("q", 0)
        self.process = _SPAWN.Process(
            target=worker_module.main,
            args=(
                child_tasks,
                child_events,
                self.cancel_seq,
                config.engine,
                config.warmup,
                _threads(config),
            ),
            name=f"pastiche-worker-{slot}",
            daemon=True,
        )
        self.inbox: asyncio.Queue[JobMessage | Exited] = asyncio.Queue()
        self.ready: asyncio.Future[int | None] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self.launched: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def gone(self) -> bool:
        """Exited, or never started because spawning it failed."""
        launch_failed = (
            self.launched is not None and self.launched.done() and self.launched.exception()
        )
        return self.exited.done() or bool(launch_failed)

    def launch(self) -> asyncio.Future[None]:
        """Start the process in a thread (spawning takes a moment); idempotent."""
        if self.launched is None:
            self.launched = self.loop.run_in_executor(None, self._start_blocking)
        return self.launched

    def _start_blocking(self) -> None:
        try:
            self.process.start()
        finally:
            for end in self._child_ends:  # the child has its copies; EOF must mean it is gone
                end.close()
        self._thread = threading.Thread(
            target=self._read, name=f"pastiche-worker-{self.slot}-reader", daemon=True
        )
        self._thread.start()
        log.info("worker %d started (pid %s)", self.slot, self.process.pid)

    def _read(self) -> None:
        """Reader thread: relay messages until the pipe closes or the process is gone."""
        try:
            while True:
                ready = wait_any([self.events, self.process.sentinel])
                if self.events in ready:
                    try:
                        message = self.events.recv()
                    except (EOFError, OSError):
                        break
                    self._post(message)
                else:  # process ended; take what it sent before dying
                    while self.events.poll(0):
                        self._post(self.events.recv())
                    break
        except (EOFError, OSError):
            pass
        finally:
            self.process.join(timeout=5)
            self._post(Exited(self.process.exitcode))

    def _post(self, message: FromWorker | Exited) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    def _deliver(self, message: FromWorker | Exited) -> None:
        if isinstance(message, Log):
            log.log(message.level, "worker %d (pid %s): %s", self.slot, self.pid, message.text)
        elif isinstance(message, Ready):
            if not self.ready.done():
                self.ready.set_result(message.pid)
        else:
            if isinstance(message, Exited):
                if not self.ready.done():
                    self.ready.set_result(None)
                if not self.exited.done():
                    self.exited.set_result(message.exitcode)
            self.inbox.put_nowait(message)

    def send(self, message: ToWorker) -> None:
        """Blocking send (call it in a thread: a big request fills the pipe buffer)."""
        with self._send_lock:
            self.tasks.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def stop(self, timeout: float) -> None:
        """Blocking: ask the worker to exit, then terminate, then kill; close the pipes."""
        if self.process.pid is not None:
            try:
                self.send(StopWorker())
            except (OSError, ValueError):
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("worker %d did not exit; terminating it", self.slot)
                self.process.terminate()
                self.process.join(2)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(2)
        if self._thread is not None:
            self._thread.join(5)
        self.tasks.close()
        self.events.close()


def _threads(config: RunnerConfig) -> int | None:
    if config.threads is not None:
        return config.threads
    if config.workers == 1:
        return None
    return max(1, (os.cpu_count() or 1) // config.workers)


class LocalBackend:
    """``config.workers`` spawned worker processes on this machine (see module docstring)."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self._slots: list[_Worker | None] = [None] * config.workers
        self._busy = [False] * config.workers
        self._failures = [0] * config.workers
        self._restarts: list[asyncio.Task[None] | None] = [None] * config.workers
        self._seq = itertools.count(1)
        self._closing = False

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for operators and tests)."""
        return [
            w.pid
            for w in self._slots
            if w is not None and w.pid is not None and w.process.is_alive()
        ]

    async def start(self) -> None:
        workers = [await self._ensure_worker(i) for i in range(self.capacity)]
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(w.ready) for w in workers], timeout=self.config.start_timeout
        )
        if pending:
            log.warning(
                "%d worker(s) not ready after %.0f s", len(pending), self.config.start_timeout
            )

    async def _ensure_worker(self, slot: int) -> _Worker:
        """The slot's live worker, started anew if it died (jobs never wait on a backoff)."""
        worker = self._slots[slot]
        if worker is None or worker.gone:
            restart = self._restarts[slot]
            if restart is not None and not restart.done():
                restart.cancel()
            worker = _Worker(slot, self.config, asyncio.get_running_loop())
            self._slots[slot] = worker
            worker.exited.add_done_callback(functools.partial(self._on_exit, worker))
        await asyncio.shield(worker.launch())
        return worker

    def _on_exit(self, worker: _Worker, _exited: asyncio.Future[int | None]) -> None:
        if self._closing or self._slots[worker.slot] is not worker:
            return
        code = worker.exited.result()
        log.warning("worker %d (pid %s) exited with code %s", worker.slot, worker.pid, code)
        if not self._busy[worker.slot]:
            self._schedule_restart(worker.slot)

    def _schedule_restart(self, slot: int) -> None:
        """Replace a dead idle worker so the next job finds a warm one; back off on crash loops."""
        pending = self._restarts[slot]
        if pending is not None and not pending.done():
            return
        delay = min(_BACKOFF_MAX, 0.5 * 2 ** self._failures[slot]) if self._failures[slot] else 0
        self._failures[slot] += 1

        async def restart() -> None:
            await asyncio.sleep(delay)
            if not self._closing and not self._busy[slot]:
                try:
                    await self._ensure_worker(slot)
                except Exception:  # the next job tries again and fails with a message
                    log.exception("could not start worker %d", slot)

        self._restarts[slot] = asyncio.get_running_loop().create_task(restart())

    async def run(
        self, job_id: str, request: JobRequest, emit: Emit, cancel: CancelToken
    ) -> TerminalEvent:
        if self._closing:
            return JobCancelled(job_id, cancel.reason or "shutdown")
        slot = self._busy.index(False)  # the runner never exceeds capacity
        self._busy[slot] = True
        worker: _Worker | None = None
        try:
            worker = await self._ensure_worker(slot)
            return await self._run_on(worker, job_id, request, emit, cancel)
        finally:
            self._busy[slot] = False
            if worker is not None and worker.gone and not self._closing:
                self._schedule_restart(slot)

    async def _run_on(
        self, worker: _Worker, job_id: str, request: JobRequest, emit: Emit, cancel: CancelToken
    ) -> TerminalEvent:
        loop = asyncio.get_running_loop()
        seq = next(self._seq)
        kill_timer: asyncio.TimerHandle | None = None

        def stop(reason: str) -> None:
            nonlocal kill_timer
            worker.cancel_seq.value = seq  # the engine's should_stop sees this within a step
            kill_timer = loop.call_later(self.config.stop_grace, kill)

        def kill() -> None:
            log.warning(
                "job %s did not stop within %.0f s; killing worker %d (pid %s)",
                job_id,
                self.config.stop_grace,
                worker.slot,
                worker.pid,
            )
            worker.kill()

        undo = cancel.on_cancel(stop)
        try:
            try:
                await loop.run_in_executor(None, worker.send, RunJob(seq, job_id, request))
            except (OSError, ValueError):
                worker.kill()  # a broken pipe means it is dying; its exit message follows
            while True:
                message = await worker.inbox.get()
                if isinstance(message, Exited):
                    return self._exited(worker, job_id, message, cancel)
                if message.job_id != job_id:
                    continue  # left over from an earlier job on this worker
                if isinstance(message, (Started, ProgressUpdate, Preview)):
                    emit(message)
                    continue
                self._failures[worker.slot] = 0  # the worker handled a job: not a crash loop
                return self._terminal(worker, message, cancel)
        finally:
            undo()
            if kill_timer is not None:
                kill_timer.cancel()

    @staticmethod
    def _exited(
        worker: _Worker, job_id: str, message: Exited, cancel: CancelToken
    ) -> TerminalEvent:
        """The worker died during the job: a crash, unless we killed it to stop the job."""
        if cancel.cancelled:
            return JobCancelled(job_id, cancel.reason or "")
        log.error(
            "job %s: worker %d (pid %s) died with exit code %s",
            job_id,
            worker.slot,
            worker.pid,
            message.exitcode,
        )
        return Failed(job_id, CRASH_MESSAGE)

    @staticmethod
    def _terminal(
        worker: _Worker, message: Done | Failed | JobCancelled | Crashed, cancel: CancelToken
    ) -> TerminalEvent:
        if isinstance(message, JobCancelled):
            return JobCancelled(message.job_id, cancel.reason or message.reason)
        if isinstance(message, Crashed):
            log.error(
                "job %s failed in worker %d (pid %s):\n%s",
                message.job_id,
                worker.slot,
                worker.pid,
                message.traceback,
            )
            return Failed(message.job_id, GENERIC_FAILURE)
        return message

    async def close(self) -> None:
        self._closing = True
        for task in self._restarts:
            if task is not None:
                task.cancel()
        loop = asyncio.get_running_loop()
        stops = []
        for worker in self._slots:
            if worker is None:
                continue
            if worker.launched is not None:
                try:
                    await asyncio.shield(worker.launched)
                except Exception:
                    pass
            stops.append(loop.run_in_executor(None, worker.stop, _EXIT_TIMEOUT))
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        self._slots = [None] * len(self._slots)

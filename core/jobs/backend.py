"""The boundary between the job runner (queue, limits, events) and whatever runs the engine.

The runner only ever calls :class:`Backend`; the local process pool in ``core.jobs.local``
is one implementation. A distributed backend (a GPU box, a cloud queue) can replace it without
changing the bot or the GIMP helper, which only see ``core.jobs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from core.jobs.events import Event, JobRequest, TerminalEvent

Emit = Callable[[Event], None]

GENERIC_FAILURE = (
    "Something went wrong while painting this image; the details are in the operator's log. "
    "Please try again."
)
"""What the user sees when a job fails for a reason that is a bug, not their input."""


class CancelToken:
    """Set once by the runner when a running job must stop: user cancel, time limit, shutdown."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._callbacks: list[Callable[[str], None]] = []

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> bool:
        """Request the stop; the first reason wins. Returns False if already cancelled."""
        if self.reason is not None:
            return False
        self.reason = reason
        for callback in list(self._callbacks):
            callback(reason)
        return True

    def on_cancel(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(reason)`` on cancel (at once if already cancelled); returns an undo."""
        if self.reason is not None:
            callback(self.reason)
            return lambda: None
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove


@runtime_checkable
class Backend(Protocol):
    """Runs one job at a time per slot; the runner never gives it more than ``capacity`` jobs."""

    @property
    def capacity(self) -> int:
        """How many jobs may run at once."""
        ...

    async def start(self) -> None:
        """Get ready (start and warm workers). Called once before the first ``run``."""
        ...

    async def run(
        self, job_id: str, request: JobRequest, emit: Emit, cancel: CancelToken
    ) -> TerminalEvent:
        """Run one job to its end and return its terminal event (Done, Failed, JobCancelled).

        ``emit`` takes Started (when the engine really begins; the time limit counts from
        there), then ProgressUpdate and Preview events. Once ``cancel`` is set
        the job must end soon (within one optimiser step, or by killing what runs it) and the
        result is a JobCancelled. Must not raise for anything the job itself did.
        """
        ...

    async def close(self) -> None:
        """Stop everything it started; called after every ``run`` has returned."""
        ...

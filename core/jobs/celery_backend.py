"""The Celery Backend: jobs painted by ``pastiche worker`` processes on other machines.

The runner keeps the queue, the limits and the time limit; this backend only carries each job
it is given to the broker (a Celery task, JSON) and follows it there: the worker's events
arrive on a Redis stream per job, read with ``redis.asyncio`` so the event loop never waits on
the network; a stop request is a key plus a wake-up the worker's heartbeat thread waits on
(the engine sees it within one optimiser step), and Celery's revoke kills the worker's child
process if the job has not stopped after ``stop_grace`` seconds. A job whose worker stops
beating (SIGKILL, out of memory, machine gone) fails within seconds. Through a Redis outage
each job waits up to ``outage_grace`` seconds; if Redis came back without its data, a job no
worker had taken is published again (the worker's claim keeps it from running twice).

``capacity`` is ``RunnerConfig.workers``: set it to the number of worker processes (GPUs)
serving this broker, so the runner's queue, not the broker's, holds the jobs waiting.
``RunnerConfig.engine``, ``warmup`` and ``threads`` belong to the workers' own command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from core.jobs import wire
from core.jobs.backend import CancelToken, Emit
from core.jobs.broker import (
    HEARTBEAT_TTL,
    KEY_TTL,
    QUEUE,
    STREAM_TTL,
    TASK_NAME,
    WORKER_KEYS,
    WORKER_LOST,
    BrokerError,
    JobKeys,
    client_options,
    explain,
    make_app,
    normalise_url,
    redact,
)
from core.jobs.events import (
    TERMINAL_EVENTS,
    Event,
    Failed,
    JobCancelled,
    JobRequest,
    TerminalEvent,
)

log = logging.getLogger(__name__)

BROKER_LOST = (
    "The connection to the painting machines was lost while this job was running. "
    "Please try again in a minute."
)
OUTAGE_GRACE = 60.0
"""Seconds a job waits for Redis to come back before it fails."""
BLOCK_MS = 200
REVOKE_WAIT = 2.0
"""Seconds a revoked job's worker gets to confirm before the job ends without it (the
revoke has killed or will kill the process; the stop key keeps the job from running again)."""
"""Longest wait for new events before the job's heartbeat and stop request are checked."""


def _connection_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError
    from redis import exceptions as rx

    return (rx.ConnectionError, rx.TimeoutError, OperationalError, OSError)


class CeleryBackend:
    """Jobs go to Celery workers through Redis (see module docstring)."""

    def __init__(
        self, config: Any, broker: str | None, *, outage_grace: float = OUTAGE_GRACE
    ) -> None:
        self.config = config
        self.broker = normalise_url(broker)
        self.outage_grace = outage_grace
        self.redis: Any = None
        self.app: Any = None
        self.tombstones: set[str] = set()  # ended jobs whose tombstone Redis has yet to get
        self._closing = False

    @property
    def capacity(self) -> int:
        return int(self.config.workers)

    async def start(self) -> None:
        """Connect (a refused password or unreachable host raises BrokerError at once)."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.broker, **client_options())
        try:
            await client.ping()
        except (redis.RedisError, OSError) as exc:
            await client.aclose()
            raise BrokerError(explain(exc, self.broker)) from None
        self.redis = client
        self.app = make_app(self.broker)
        await asyncio.to_thread(lambda: (self.app.amqp, self.app.producer_pool))  # build once
        workers = await self.workers()
        if workers:
            log.info("broker %s: %d worker(s) ready", redact(self.broker), len(workers))
        else:
            log.warning(
                "broker %s: no worker is connected yet; jobs wait until one is "
                "(start one with `pastiche worker`)",
                redact(self.broker),
            )

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers' presence records (node, host, pid, device, job), for operators."""
        if self.redis is None:
            return []
        keys = [key async for key in self.redis.scan_iter(match=WORKER_KEYS, count=100)]
        records = await self.redis.mget(keys) if keys else []
        found = []
        for raw in records:
            try:
                found.append(json.loads(raw))
            except (TypeError, ValueError):
                continue
        return sorted(found, key=lambda w: str(w.get("node")))

    async def run(
        self, job_id: str, request: JobRequest, emit: Emit, cancel: CancelToken
    ) -> TerminalEvent:
        if self._closing or self.redis is None:
            return JobCancelled(job_id, cancel.reason or "shutdown")
        return await _RemoteJob(self, job_id, emit, cancel).run(request)

    async def close(self) -> None:
        self._closing = True
        if self.redis is not None:
            await self.redis.aclose()
        if self.app is not None:
            await asyncio.to_thread(self.app.close)  # the producer pool's connections

    # ---- blocking Celery calls (run in a thread) --------------------------------------------
    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        backstop = self.config.job_timeout + self.config.stop_grace + 60
        self.app.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id, "request": payload},
            task_id=job_id,
            queue=QUEUE,
            time_limit=backstop,  # Celery kills the child if all else failed
            argsrepr="()",
            kwargsrepr=repr({"job_id": job_id}),  # no user images in logs or Flower
        )

    def revoke(self, job_id: str) -> None:
        self.app.control.revoke(job_id, terminate=True, signal="SIGKILL")


class _RemoteJob:
    """One job's trip to a worker and back, as seen from the runner."""

    def __init__(
        self, backend: CeleryBackend, job_id: str, emit: Emit, cancel: CancelToken
    ) -> None:
        self.backend, self.redis = backend, backend.redis
        self.job_id, self.emit, self.cancel = job_id, emit, cancel
        self.keys = JobKeys(job_id)
        self.payload: dict[str, Any] = {}
        self.last_id: bytes | str = "0-0"
        self.grace_from = time.monotonic()
        self.claimed_at: float | None = None
        self.stop_sent_at: float | None = None
        self.revoked = False
        self.outage_since: float | None = None
        self.verify_data = False
        self.republish_at: float | None = None

    async def run(self, request: JobRequest) -> TerminalEvent:
        self.payload = wire.request_to_json(request)
        try:
            if not await self._publish():
                return JobCancelled(self.job_id, self.cancel.reason or "")
            while True:
                try:
                    terminal = await self._step()
                except _connection_errors() as exc:
                    terminal = await self._outage(exc)
                if terminal is not None:
                    return terminal
        finally:
            await self._forget()

    # ---- publishing ------------------------------------------------------------------------
    async def _publish(self) -> bool:
        """Put the task on the broker, retrying through an outage; False if cancelled first
        (the runner's start_timeout bounds the wait)."""
        delay, warned = 0.2, False
        while not self.cancel.cancelled:
            try:
                await self.redis.set(self.keys.sent, "1", ex=KEY_TTL)
                await asyncio.to_thread(self.backend.publish, self.job_id, self.payload)
                return True
            except _connection_errors() as exc:
                if not warned:
                    log.warning("job %s: cannot reach the broker (%s); retrying", self.job_id, exc)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        return False

    # ---- following the job -----------------------------------------------------------------
    async def _step(self) -> TerminalEvent | None:
        if self.cancel.cancelled and self.stop_sent_at is None:
            await self._send_stop()
        response = await self.redis.xread(
            {self.keys.events: self.last_id}, count=32, block=BLOCK_MS
        )
        if self.outage_since is not None:
            self._recovered()
        terminal = self._relay(response)
        if terminal is not None:
            return terminal
        return await self._check()

    def _relay(self, response: Any) -> TerminalEvent | None:
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                event = self._decode(fields)
                if isinstance(event, TERMINAL_EVENTS):
                    return event
                if event is not None:
                    self.emit(event)
        return None

    def _decode(self, fields: dict[bytes, bytes]) -> Event | None:
        try:
            event, detail = wire.event_from_fields(fields, self.job_id)
        except wire.WireError as exc:
            log.warning("job %s: ignoring a malformed event (%s)", self.job_id, exc)
            return None
        if detail:
            log.error("job %s failed on a worker %s", self.job_id, detail)
        return event

    async def _check(self) -> TerminalEvent | None:
        """Is the job taken, is its worker alive, has its stop request been honoured?"""
        now = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.claim)
        pipe.exists(self.keys.alive)
        pipe.exists(self.keys.sent)
        claimed, alive, sent = await pipe.execute()
        if self.verify_data:
            self.verify_data = False
            if not sent:
                await self._after_data_loss(now)
        if claimed and self.claimed_at is None:
            self.claimed_at = now
        if self.republish_at is not None and now >= self.republish_at:
            self.republish_at = None
            if not claimed:
                log.warning("job %s: publishing it again (Redis lost it)", self.job_id)
                await self._publish()
        if self.stop_sent_at is not None:
            ended = await self._stopping(now, bool(claimed))
            if ended is not None:
                return ended
        if self.claimed_at is not None and not alive:
            if now - max(self.claimed_at, self.grace_from) > HEARTBEAT_TTL:
                return await self._lost()
        return None

    async def _lost(self) -> TerminalEvent:
        """The heartbeat stopped: take what the worker sent before it went, else fail."""
        terminal = self._relay(await self.redis.xread({self.keys.events: self.last_id}))
        if terminal is not None:
            return terminal
        if self.cancel.cancelled:
            return JobCancelled(self.job_id, self.cancel.reason or "")
        holder = await self.redis.get(self.keys.claim)
        log.error("job %s: its worker (%s) stopped beating", self.job_id, (holder or b"?").decode())
        return Failed(self.job_id, WORKER_LOST)

    # ---- stopping --------------------------------------------------------------------------
    async def _send_stop(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.stop, self.cancel.reason or "cancel", ex=KEY_TTL)
        pipe.rpush(self.keys.wake, "stop")
        pipe.expire(self.keys.wake, STREAM_TTL)
        await pipe.execute()
        self.stop_sent_at = time.monotonic()

    async def _stopping(self, now: float, claimed: bool) -> TerminalEvent | None:
        if not claimed:  # no worker has it, and the stop key keeps any from starting it
            return JobCancelled(self.job_id, self.cancel.reason or "")
        grace = self.backend.config.stop_grace
        waited = now - (self.stop_sent_at or now)
        if waited > grace and not self.revoked:
            self.revoked = True
            log.warning("job %s did not stop within %.0f s; revoking it", self.job_id, grace)
            try:
                await asyncio.to_thread(self.backend.revoke, self.job_id)
            except _connection_errors() as exc:
                log.warning("job %s: revoke failed: %s", self.job_id, exc)
        if waited > grace + REVOKE_WAIT:
            log.warning("job %s: its worker never confirmed the stop", self.job_id)
            return JobCancelled(self.job_id, self.cancel.reason or "")
        return None

    # ---- broker outages --------------------------------------------------------------------
    async def _outage(self, exc: BaseException) -> TerminalEvent | None:
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            log.warning("job %s: lost the connection to Redis (%s); waiting", self.job_id, exc)
        elif now - self.outage_since > self.backend.outage_grace:
            log.error("job %s: Redis unreachable for %.0f s", self.job_id, now - self.outage_since)
            if self.cancel.cancelled:
                return JobCancelled(self.job_id, self.cancel.reason or "")
            return Failed(self.job_id, BROKER_LOST)
        if self.cancel.cancelled and self.claimed_at is None:
            return JobCancelled(self.job_id, self.cancel.reason or "")  # it never started
        await asyncio.sleep(0.5)
        return None

    def _recovered(self) -> None:
        log.info("job %s: Redis is back", self.job_id)
        self.outage_since = None
        self.grace_from = time.monotonic()  # the worker needs a beat to be seen again
        self.verify_data = True

    async def _after_data_loss(self, now: float) -> None:
        """Redis came back empty (restarted without persistence): the task message and the
        stop request may be gone. A worker that has the job beats again within a second;
        a job nobody has is published again after a heartbeat's grace."""
        log.warning("job %s: Redis lost its data (restarted without persistence?)", self.job_id)
        await self.redis.set(self.keys.sent, "1", ex=KEY_TTL)
        if self.stop_sent_at is not None:
            self.stop_sent_at = None  # send it again
        if self.claimed_at is None:
            self.republish_at = now + HEARTBEAT_TTL

    async def _forget(self) -> None:
        """Leave a tombstone (no copy of this job may ever start) and drop the rest; during an
        outage the tombstone waits for the next job that reaches Redis."""
        ignored: tuple[type[BaseException], ...] = (asyncio.TimeoutError, *_connection_errors())
        owed = self.backend.tombstones
        owed.add(self.job_id)
        pending = sorted(owed)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in pending:
                pipe.set(JobKeys(job_id).stop, "over", ex=KEY_TTL)
            pipe.delete(self.keys.events, self.keys.wake, self.keys.sent)
            await asyncio.wait_for(pipe.execute(), 5)
        except ignored:
            return  # the other keys expire by themselves
        owed.difference_update(pending)

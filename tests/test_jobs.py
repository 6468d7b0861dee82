"""The job runner with real spawned worker processes.

Most tests share one runner (one worker) driving tests/fake_engines.py, so the worker spawn is
paid once; each test uses its own owners and leaves no job behind. The last tests start their
own runners: load with two workers, close(), and the real engine with random weights.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import pytest_asyncio
from PIL import Image

from core.errors import BusyError, LimitError
from core.jobs import (
    TERMINAL_EVENTS,
    Done,
    Failed,
    JobCancelled,
    JobRequest,
    JobState,
    Preview,
    ProgressUpdate,
    Queued,
    Runner,
    RunnerConfig,
    Started,
)
from core.jobs.backend import GENERIC_FAILURE, Backend
from core.jobs.local import CRASH_MESSAGE
from core.jobs.runner import START_FAILURE
from core.settings import Settings
from tests.conftest import image_bytes

CONTENT = image_bytes(width=32, height=24, seed=1)
STYLE = image_bytes(width=32, height=32, seed=2)
TIMEOUT = 1.5  # job_timeout of the shared runner; ordinary fake jobs take ~0.1-0.5 s
WAIT = 30  # generous bound on awaiting a terminal event, so a bug fails instead of hanging


def req(mode: str = "ok", steps: int = 5, label: str = "", content: bytes = CONTENT) -> JobRequest:
    settings = Settings(iterations=steps, extra={"mode": mode})
    return JobRequest(content, ((STYLE, 1.0),), settings, label)


async def finish(job):
    return await asyncio.wait_for(job.wait(), WAIT)


async def collect(job) -> list:
    return [e async for e in job.events()]


async def first(job, kind):
    async for event in job.events():
        if isinstance(event, kind):
            return event
    raise AssertionError(f"job ended without a {kind.__name__}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner():
    config = RunnerConfig(
        workers=1,
        max_queue=3,
        max_per_owner=2,
        max_pixels=5000,
        job_timeout=TIMEOUT,
        stop_grace=1.0,
        engine="tests.fake_engines:by_mode",
    )
    async with Runner(config) as r:
        yield r
        assert r.queue_length == 0 and not r.running, "a test left a job behind"


def worker_pid(runner: Runner) -> int:
    (pid,) = runner.backend.pids
    return pid


# ---- queue ----------------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="module")
async def test_fifo_order_positions_and_events(runner):
    order: list[tuple[str, str]] = []
    seen: dict[str, list] = {}

    async def watch(job, name):
        seen[name] = [e async for e in job.events()]
        for e in seen[name]:
            if isinstance(e, (Started, Done)):
                order.append((type(e).__name__, name))

    a = await runner.submit(req(steps=25, label="first"), owner="fifo-a")
    b = await runner.submit(req(), owner="fifo-b")
    c = await runner.submit(req(), owner="fifo-c")
    assert (a.state, a.position) == (JobState.RUNNING, None)
    assert (b.position, c.position, runner.queue_length) == (1, 2, 2)
    assert runner.get(c.id) is c and runner.jobs_of("fifo-c") == [c]
    watchers = [asyncio.create_task(watch(j, n)) for j, n in ((a, "a"), (b, "b"), (c, "c"))]
    await asyncio.wait_for(asyncio.gather(*watchers), WAIT)

    starts = [name for kind, name in order if kind == "Started"]
    assert starts == ["a", "b", "c"]
    assert [e.position for e in seen["c"] if isinstance(e, Queued)] == [2, 1]
    assert [e.position for e in seen["b"] if isinstance(e, Queued)] == [1]
    for events in seen.values():
        assert sum(isinstance(e, TERMINAL_EVENTS) for e in events) == 1
        assert isinstance(events[-1], Done)

    # Progress is coalesced (25 steps -> a few updates), the last one always arrives.
    progress = [e for e in seen["a"] if isinstance(e, ProgressUpdate)]
    assert 1 <= len(progress) < 25 and progress[-1].percent == 100.0
    assert progress[-1].step == progress[-1].total_steps == 25
    previews = [e for e in seen["a"] if isinstance(e, Preview)]
    assert len(previews) == 1 and Image.open(io.BytesIO(previews[0].png)).size == (8, 8)

    done = a.result
    assert done is not None and a.state is JobState.DONE and a.done
    img = Image.open(io.BytesIO(done.png))
    assert img.format == "PNG" and (img.width, img.height) == (done.width, done.height) == (32, 24)
    assert img.convert("RGB").getpixel((0, 0)) == tuple(
        255 - v for v in Image.open(io.BytesIO(CONTENT)).convert("RGB").getpixel((0, 0))
    )
    assert done.metadata["label"] == "first" and done.metadata["pid"] == worker_pid(runner)
    # A late reader gets a replay ending with the terminal event.
    replay = [e async for e in a.events()]
    assert isinstance(replay[0], Queued) and replay[-1] == done
    assert runner.jobs_of("fifo-a") == [] and runner.get(a.id) is a


@pytest.mark.asyncio(loop_scope="module")
async def test_animated_content_comes_back_animated(runner):
    """A GIF takes the worker's animation path: progress is frame i of n, and the result is the
    clip in the input's kind (or the format asked for) with its timing."""
    from core.animation import Animation, encode_animation, load_animation

    frames = [Image.new("RGB", (32, 24), (40 * i, 90, 200 - 40 * i)) for i in range(3)]
    gif = encode_animation(Animation(frames, [60, 70, 80], loop=0), "gif")
    job = await runner.submit(JobRequest(gif, ((STYLE, 1.0),), Settings(iterations=4)), "anim")
    events = await asyncio.wait_for(collect(job), WAIT)
    done = events[-1]
    assert isinstance(done, Done) and done.mime == "image/gif" and done.frames == 3
    assert done.animated and (done.width, done.height) == (32, 24)
    clip = load_animation(done.data)
    assert len(clip) == 3 and clip.durations == [60, 70, 80] and clip.loop == 0
    assert clip.frames[1].getpixel((0, 0)) == (255 - 40, 255 - 90, 255 - 160)
    progress = [e for e in events if isinstance(e, ProgressUpdate)]
    assert progress[-1].frame == progress[-1].frames == 3 and progress[-1].percent == 100.0

    as_mp4 = JobRequest(gif, ((STYLE, 1.0),), Settings(iterations=1, max_frames=2), "", "mp4")
    done = await finish(await runner.submit(as_mp4, "anim"))
    assert isinstance(done, Done) and done.mime == "video/mp4" and done.frames == 2
    assert load_animation(done.data).durations == [130, 80]


@pytest.mark.asyncio(loop_scope="module")
async def test_broken_animation_fails_with_its_reason(runner):
    from core.animation import Animation, encode_animation

    frames = [Image.new("RGB", (32, 24), (40 * i, 90, 20)) for i in range(4)]
    gif = encode_animation(Animation(frames, [60] * 4), "gif")
    end = await finish(await runner.submit(JobRequest(gif[:-40], ((STYLE, 1.0),)), "broken"))
    assert isinstance(end, Failed) and "truncated or corrupt" in end.message


@pytest.mark.asyncio(loop_scope="module")
async def test_limits_reject_at_once(runner):
    slow = await runner.submit(req(steps=40), owner="lim")
    queued = await runner.submit(req(), owner="lim")
    with pytest.raises(BusyError, match="limit is 2"):
        await runner.submit(req(), owner="lim")
    others = [await runner.submit(req(), owner=f"lim-{i}") for i in range(2)]
    assert runner.queue_length == 3
    with pytest.raises(BusyError, match="queue is full"):
        await runner.submit(req(), owner="lim-x")
    with pytest.raises(LimitError, match="80x80 pixels"):
        await runner.submit(req(content=image_bytes(width=80, height=80)), owner="lim-y")
    assert runner.jobs_of("lim-x") == [] and runner.jobs_of("lim-y") == []
    for job in (slow, queued, *others):
        assert isinstance(await finish(job), Done)
    # The owner may submit again once their jobs are done.
    assert isinstance(await finish(await runner.submit(req(), owner="lim")), Done)


@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_queued_and_running(runner):
    pid = worker_pid(runner)
    running = await runner.submit(req(steps=5000), owner="cancel-a")
    b = await runner.submit(req(), owner="cancel-b")
    c = await runner.submit(req(), owner="cancel-c")
    assert c.position == 2
    assert await b.cancel() is True
    assert b.state is JobState.CANCELLED and isinstance(await finish(b), JobCancelled)
    assert c.position == 1 and runner.queue_length == 1
    assert [e.position for e in c._history if isinstance(e, Queued)] == [1]  # latest kept

    await asyncio.wait_for(first(running, ProgressUpdate), WAIT)
    assert await running.cancel() is True
    end = await finish(running)
    assert isinstance(end, JobCancelled) and "cancelled" in end.reason
    # Stopped through should_stop, not by killing the worker (stop_grace is 1 s).
    assert worker_pid(runner) == pid
    assert isinstance(await finish(c), Done)
    assert await c.cancel() is False and await b.cancel() is False


# ---- limits in time -------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="module")
async def test_time_limit_stops_a_cooperative_job(runner):
    pid = worker_pid(runner)
    job = await runner.submit(req(steps=5000), owner="slow")
    end = await finish(job)
    assert isinstance(end, Failed) and "took too long" in end.message
    assert job.error == end.message and job.state is JobState.FAILED
    assert worker_pid(runner) == pid


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_time_limit_kills_a_stuck_worker(runner):
    pid = worker_pid(runner)
    stuck = await runner.submit(req("stubborn"), owner="stuck")
    after = await runner.submit(req(), owner="stuck-next")
    end = await finish(stuck)
    assert isinstance(end, Failed) and "took too long" in end.message
    assert isinstance(await finish(after), Done)
    assert after.result.metadata["pid"] != pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---- faults ---------------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="module")
async def test_job_errors_fail_alone(runner, caplog):
    pid = worker_pid(runner)
    caplog.set_level(logging.ERROR, logger="core.jobs.local")
    bug = await runner.submit(req("raise"), owner="err")
    user = await runner.submit(req("user_error"), owner="err")
    end = await finish(bug)
    assert isinstance(end, Failed) and end.message == GENERIC_FAILURE
    assert "ZeroDivisionError: a bug in the engine" in caplog.text  # traceback for the operator
    end = await finish(user)
    assert end == Failed(user.id, "The size must be between 16 and 8192, got 3.")
    truncated = await runner.submit(req(content=CONTENT[: len(CONTENT) // 2]), owner="err2")
    garbage = await runner.submit(req(content=b"this is not an image"), owner="err2")
    for job in (truncated, garbage):
        end = await finish(job)
        assert isinstance(end, Failed) and "could not be read" in end.message
    ok = await finish(await runner.submit(req(), owner="err"))
    assert isinstance(ok, Done) and ok.metadata["pid"] == pid == worker_pid(runner)


@pytest.mark.parametrize("mode", ["kill", "segfault"])
@pytest.mark.asyncio(loop_scope="module")
async def test_worker_death_fails_the_job_and_the_queue_goes_on(runner, mode):
    pid = worker_pid(runner)
    doomed = await runner.submit(req(mode), owner="crash")
    behind = await runner.submit(req(), owner="crash-next")
    end = await finish(doomed)
    assert end == Failed(doomed.id, CRASH_MESSAGE)
    assert isinstance(await finish(behind), Done)
    new_pid = behind.result.metadata["pid"]
    assert new_pid != pid and runner.backend.pids == [new_pid]


@pytest.mark.asyncio(loop_scope="module")
async def test_idle_worker_death_is_replaced_before_the_next_job(runner):
    pid = worker_pid(runner)
    os.kill(pid, signal.SIGKILL)
    for _ in range(WAIT * 10):  # the replacement starts without waiting for a job
        if runner.backend.pids not in ([], [pid]):
            break
        await asyncio.sleep(0.1)
    (new_pid,) = runner.backend.pids
    assert new_pid != pid
    done = await finish(await runner.submit(req(), owner="idle"))
    assert isinstance(done, Done) and done.metadata["pid"] == new_pid


# ---- the event loop -------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="module")
async def test_event_loop_stays_responsive(runner):
    lag = 0.0
    stop = asyncio.Event()

    async def ticker():
        nonlocal lag
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lag = max(lag, loop.time() - before - 0.01)

    tick = asyncio.create_task(ticker())
    big = image_bytes(width=70, height=70, seed=3)
    jobs = [await runner.submit(req(steps=15, content=big), owner=f"lag-{i}") for i in range(3)]
    for job in jobs:
        assert isinstance(await finish(job), Done)
    stop.set()
    await tick
    assert lag < 0.25


def test_importing_the_runner_does_not_import_torch():
    code = "import sys, core.jobs, core.jobs.local; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- own runners: load, close ---------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="module")
async def test_many_owners_then_close_leaves_nothing():
    config = RunnerConfig(
        workers=2, max_queue=100, max_per_owner=10, engine="tests.fake_engines:by_mode"
    )
    runner = Runner(config)
    await runner.start()
    pids = runner.backend.pids
    assert len(pids) == 2

    jobs = await asyncio.gather(
        *(runner.submit(req(steps=1), owner=f"owner-{i % 10}") for i in range(50))
    )
    cancelled = jobs[10::7]
    for job in cancelled:
        await job.cancel()
    streams = await asyncio.wait_for(asyncio.gather(*(collect(job) for job in jobs)), WAIT)
    for job, events in zip(jobs, streams, strict=True):
        terminal = [e for e in events if isinstance(e, TERMINAL_EVENTS)]
        assert len(terminal) == 1 and events[-1] is terminal[0] and job.done
        assert isinstance(terminal[0], JobCancelled if job in cancelled else Done)
    assert {j.result.metadata["pid"] for j in jobs if j.result} == set(pids)
    # Two workers share the CPU cores instead of each taking all of them.
    expected_threads = max(1, (os.cpu_count() or 1) // 2)
    assert {j.result.metadata["threads"] for j in jobs if j.result} == {expected_threads}

    # close() with one job running and two waiting: each gets its terminal event.
    running = await runner.submit(req(steps=5000), owner="late")
    waiting = [await runner.submit(req(), owner=f"late-{i}") for i in range(3)]
    await asyncio.wait_for(first(running, ProgressUpdate), WAIT)
    await asyncio.wait_for(runner.close(), WAIT)
    for job in (running, *waiting):
        end = job._terminal.result()
        assert isinstance(end, JobCancelled) and "shut down" in end.reason
    with pytest.raises(BusyError):
        await runner.submit(req(), owner="after")
    alive = {p.pid for p in multiprocessing.active_children()}
    assert runner.backend.pids == [] and not alive & set(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---- the real engine (random weights) -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_real_engine_jobs(tiny_settings, caplog, content_png, style_png):
    caplog.set_level(logging.INFO, logger="core.jobs.local")
    config = RunnerConfig(warmup=tiny_settings(iterations=1, pyramid=False), threads=1)

    def real(content=content_png, **changes) -> JobRequest:
        changes = {"iterations": 1, "pyramid": False, **changes}
        return JobRequest(content, ((style_png, 1.0),), tiny_settings(**changes), "test")

    async with Runner(config) as runner:
        assert "warm-up done" in caplog.text
        pid = worker_pid(runner)
        job = await runner.submit(real(iterations=2, preview_every=1), owner="real")
        events = [e async for e in job.events()]
        done = events[-1]
        assert isinstance(done, Done), events[-1]
        img = Image.open(io.BytesIO(done.png))
        assert img.format == "PNG" and img.size == (done.width, done.height) == (64, 48)
        assert any(isinstance(e, ProgressUpdate) for e in events)
        assert any(isinstance(e, Preview) for e in events)
        assert done.metadata

        corrupt = await runner.submit(real(content=content_png[:100]), owner="real")
        end = await finish(corrupt)
        assert isinstance(end, Failed) and end.message != GENERIC_FAILURE
        assert isinstance(await finish(await runner.submit(real(), owner="real")), Done)
        assert worker_pid(runner) == pid

        doomed = await runner.submit(real(iterations=100_000), owner="real")
        await asyncio.wait_for(first(doomed, ProgressUpdate), WAIT)
        os.kill(pid, signal.SIGKILL)
        assert await finish(doomed) == Failed(doomed.id, CRASH_MESSAGE)
        assert isinstance(await finish(await runner.submit(real(), owner="real")), Done)
        assert worker_pid(runner) != pid


# ---- the Backend boundary (no processes) ----------------------------------------------------
class ScriptedBackend:
    """An in-loop Backend, as a remote one would be: proves the runner needs nothing else."""

    capacity = 1

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def run(self, job_id, request, emit, cancel):
        if self.behaviour == "raise":
            raise RuntimeError("the remote service is down")
        if self.behaviour == "ok":
            emit(ProgressUpdate(job_id, 50.0, 1, 2, 1, 1, 1.0, {"total": 1.0}))
            emit(ProgressUpdate("someone-else", 50.0, 1, 2, 1, 1, 1.0, {}))  # ignored
            return Done(job_id, b"png", {"remote": True}, 1, 1)
        stopped = asyncio.Event()  # "hang": never starts, ends only when cancelled
        cancel.on_cancel(lambda reason: stopped.set())
        await stopped.wait()
        return JobCancelled(job_id, "")

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("ok", Done),
        ("raise", Failed(job_id="", message=GENERIC_FAILURE)),
        ("hang", Failed(job_id="", message=START_FAILURE)),
    ],
)
async def test_runner_with_another_backend(behaviour, expected):
    backend = ScriptedBackend(behaviour)
    assert isinstance(backend, Backend)
    async with Runner(RunnerConfig(start_timeout=0.2), backend=backend) as runner:
        assert backend.started
        job = await runner.submit(req(), owner="remote")
        events = await asyncio.wait_for(collect(job), WAIT)
    assert backend.closed
    if expected is Done:
        assert [type(e) for e in events] == [Queued, Started, ProgressUpdate, Done]
        assert events[2].job_id == job.id and job.result.metadata == {"remote": True}
    else:
        assert events[-1] == Failed(job.id, expected.message)
        assert not any(isinstance(e, Started) for e in events)

"""The Celery backend with a real redis-server and two real ``pastiche worker`` processes.

The two workers stand in for two GPU machines; they run tests/fake_engines.py's ``by_mode``
(torch-free, 20 ms a step) with their own ``--device`` and ``--weights``. Most tests share one
runner of capacity 2; the ones that kill a worker or restart Redis come last and leave two
live workers behind them.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from core.errors import SettingsError
from core.jobs import (
    TERMINAL_EVENTS,
    Done,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Queued,
    Runner,
    RunnerConfig,
    Started,
    wire,
)
from core.jobs.backend import GENERIC_FAILURE
from core.jobs.broker import QUEUE, WORKER_LOST, BrokerError, JobKeys, make_app, normalise_url
from core.jobs.celery_backend import CeleryBackend
from core.jobs.celery_painter import NO_INIT_IMAGE, REDELIVERED
from core.settings import Settings
from tests.celery_procs import ROOT, celery_stack, make_certificates
from tests.conftest import image_bytes

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONTENT = image_bytes(width=32, height=24, seed=1)
STYLE = image_bytes(width=32, height=32, seed=2)
TIMEOUT = 2.0  # the shared runner's job_timeout; ordinary fake jobs take ~0.1-0.3 s
WAIT = 60  # bound on awaiting an event, so a bug fails instead of hanging


def req(mode: str = "ok", steps: int = 5, label: str = "", **settings) -> JobRequest:
    return JobRequest(
        CONTENT,
        ((STYLE, 1.0),),
        Settings(iterations=steps, extra={"mode": mode}, **settings),
        label,
    )


async def finish(job):
    return await asyncio.wait_for(job.wait(), WAIT)


async def collect(job) -> list:
    return [e async for e in job.events()]


async def first(job, kind):
    async for event in job.events():
        if isinstance(event, kind):
            return event
    raise AssertionError(f"job ended without a {kind.__name__}")


@pytest.fixture(scope="module")
def worker_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "worker-own.pth"
    path.write_bytes(b"the fake engine never reads this")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, worker_weights: Path):
    args = ("--engine", "tests.fake_engines:by_mode", "--device", "cpu")
    with celery_stack(
        tmp_path_factory.mktemp("celery"), 2, *args, "--weights", str(worker_weights)
    ) as s:
        yield s


def config(**changes) -> RunnerConfig:
    values = dict(workers=2, max_queue=60, max_per_owner=10, job_timeout=TIMEOUT, stop_grace=1.0)
    values.update(changes)
    return RunnerConfig(**values)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(stack):
    cfg = config()
    async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as r:
        yield r
        assert r.queue_length == 0 and not r.running, "a test left a job behind"


# ---- painting -------------------------------------------------------------------------------
async def test_jobs_spread_over_both_workers_with_events_in_order(runner, stack):
    pids = stack.child_pids()
    assert len(pids) == 2
    jobs = [await runner.submit(req(steps=8, label=f"j{i}"), owner=f"spread-{i}") for i in range(6)]
    streams = await asyncio.wait_for(asyncio.gather(*(collect(j) for j in jobs)), WAIT)
    for job, events in zip(jobs, streams, strict=True):
        kinds = [type(e) for e in events]
        assert kinds[0] is Queued and kinds[-1] is Done and kinds.count(Done) == 1
        assert sum(isinstance(e, TERMINAL_EVENTS) for e in events) == 1
        assert kinds.index(Started) < kinds.index(Preview) < kinds.index(ProgressUpdate)
        steps = [e.step for e in events if isinstance(e, ProgressUpdate)]
        assert steps == sorted(steps) and steps[-1] == 8  # in order, the last always sent
        (preview,) = [e for e in events if isinstance(e, Preview)]
        assert Image.open(io.BytesIO(preview.png)).size == (8, 8)
        done = events[-1]
        img = Image.open(io.BytesIO(done.png))
        assert img.format == "PNG" and img.size == (done.width, done.height) == (32, 24)
        assert img.convert("RGB").getpixel((0, 0)) == tuple(
            255 - v for v in Image.open(io.BytesIO(CONTENT)).convert("RGB").getpixel((0, 0))
        )
        assert done.metadata["label"] == job.request.label
    assert {j.result.metadata["pid"] for j in jobs} == set(pids.values())


async def test_server_side_settings_cannot_be_set_through_the_broker(runner, worker_weights):
    sneaky = req(weights="/etc/passwd", device="cuda:7")
    done = await finish(await runner.submit(sneaky, owner="sneaky"))
    assert isinstance(done, Done)
    assert done.metadata["device"] == "cpu" and done.metadata["weights"] == str(worker_weights)
    init = req(init="image", init_image="/etc/hosts")
    end = await finish(await runner.submit(init, owner="sneaky"))
    assert end == Failed(end.job_id, NO_INIT_IMAGE)


async def test_job_errors_fail_alone(runner, stack, caplog):
    pids = stack.child_pids()
    bug = await runner.submit(req("raise"), owner="err")
    user = await runner.submit(req("user_error"), owner="err")
    garbage = await runner.submit(req(), owner="err-2")
    end = await finish(bug)
    assert end == Failed(bug.id, GENERIC_FAILURE)
    assert "ZeroDivisionError: a bug in the engine" in caplog.text  # in the runner's log
    assert await finish(user) == Failed(user.id, "The size must be between 16 and 8192, got 3.")
    assert isinstance(await finish(garbage), Done)
    assert stack.child_pids() == pids


# ---- cancel and time limits -----------------------------------------------------------------
async def test_cancel_queued_in_the_broker_and_running(stack):
    cfg = config(workers=3)  # one more slot than workers: the third job waits in the broker
    async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as runner:
        pids = stack.child_pids()
        running = [await runner.submit(req(steps=5000), owner=f"cancel-{i}") for i in range(2)]
        for job in running:
            await asyncio.wait_for(first(job, ProgressUpdate), WAIT)
        waiting = await runner.submit(req(), owner="cancel-broker")
        queued = await runner.submit(req(), owner="cancel-runner")
        assert queued.position == 1 and waiting.position is None
        client = stack.server.client()
        for _ in range(WAIT * 10):  # published...
            if client.llen(QUEUE):
                break
            await asyncio.sleep(0.1)
        for _ in range(10):  # ...and no busy worker reserves it behind its long job (no prefetch)
            await asyncio.sleep(0.1)
            assert client.llen(QUEUE) == 1 and not client.exists(JobKeys(waiting.id).claim)
        assert await queued.cancel() and isinstance(await finish(queued), JobCancelled)
        assert await waiting.cancel() and isinstance(await finish(waiting), JobCancelled)
        for job in running:
            assert await job.cancel()
        for job in running:
            end = await finish(job)
            assert isinstance(end, JobCancelled) and "cancelled" in end.reason
        assert stack.child_pids() == pids  # stopped through should_stop, not killed
        # The cancelled message is still taken by a worker once one is free, and dropped.
        keys = JobKeys(waiting.id)
        for _ in range(WAIT * 10):
            if client.exists(keys.claim) and client.exists(keys.events):
                break
            await asyncio.sleep(0.1)
        entries = client.xrange(keys.events)
        kinds = [fields[b"type"] for _, fields in entries]
        assert kinds == [b"JobCancelled"]  # never Started


async def test_time_limit_stops_a_cooperative_job(runner, stack):
    pids = stack.child_pids()
    job = await runner.submit(req(steps=5000), owner="slow")
    end = await finish(job)
    assert isinstance(end, Failed) and "took too long" in end.message
    assert stack.child_pids() == pids


async def test_time_limit_revokes_a_stuck_job(runner, stack):
    stuck = await runner.submit(req("stubborn"), owner="stuck")
    await asyncio.wait_for(first(stuck, Started), WAIT)
    holder = stack.holder(stuck.id)
    pid = stack.child_pids()[holder.node]
    end = await finish(stuck)
    assert isinstance(end, Failed) and "took too long" in end.message
    for _ in range(WAIT * 10):  # Celery's revoke kills the painting process
        if pid not in stack.child_pids().values():
            break
        await asyncio.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert holder.process.poll() is None  # the worker itself lives on with a new child
    stack.wait_ready()
    again = await finish(await runner.submit(req(), owner="stuck"))
    assert isinstance(again, Done)


# ---- never twice, never pickle --------------------------------------------------------------
async def test_a_redelivered_job_fails_clearly_and_a_duplicate_is_dropped(runner, stack):
    client = stack.server.client()
    app = make_app(stack.url)
    payload = wire.request_to_json(req())
    try:
        # Claimed by a worker that is gone (no heartbeat): fail it, do not paint it again.
        client.set(JobKeys("ghost").claim, "lost@elsewhere pid 1")
        app.send_task("pastiche.paint", kwargs={"job_id": "ghost", "request": payload})
        # Claimed by a worker that is alive: a second copy is dropped without a word.
        client.set(JobKeys("twin").claim, "busy@elsewhere pid 2")
        client.set(JobKeys("twin").alive, "busy@elsewhere pid 2", ex=60)
        app.send_task("pastiche.paint", kwargs={"job_id": "twin", "request": payload})
        for _ in range(WAIT * 10):
            if client.exists(JobKeys("ghost").events):
                break
            await asyncio.sleep(0.1)
        ((_, fields),) = client.xrange(JobKeys("ghost").events)
        event, _ = wire.event_from_fields(fields, "ghost")
        assert event == Failed("ghost", REDELIVERED)
        assert client.get(JobKeys("ghost").stop) == b"redelivered"
        done = await finish(await runner.submit(req(), owner="after-twin"))  # queue moved on
        assert isinstance(done, Done) and not client.exists(JobKeys("twin").events)
    finally:
        app.close()


async def test_workers_accept_only_json_and_their_own_task(runner, stack, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    app = make_app(stack.url)
    try:
        with app.connection_for_write() as conn:
            producer = conn.Producer()
            producer.publish(
                pickle.dumps(Exploit()),
                routing_key=QUEUE,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                headers={"task": "pastiche.paint", "id": "pickled"},
            )
        app.send_task("os.system", args=["touch " + str(marker)], queue=QUEUE)
        await asyncio.sleep(1.0)
        done = await finish(await runner.submit(req(), owner="after-pickle"))
    finally:
        app.close()
    assert isinstance(done, Done) and not marker.exists()
    logs = "\n".join(w.tail(400) for w in stack.workers)
    assert "untrusted content" in logs.lower() or "disallowed" in logs.lower()
    assert "unregistered task" in logs.lower()


# ---- the broker -----------------------------------------------------------------------------
async def test_broker_errors_are_clear(stack):
    wrong = stack.url.replace(stack.server.password, "wrong")
    with pytest.raises(BrokerError, match="refused the password"):
        await CeleryBackend(config(), wrong).start()
    nobody = f"redis://:pw@127.0.0.1:{stack.server.port + 1 if stack.server.port < 65535 else 1}/0"
    with pytest.raises(BrokerError, match="Cannot reach Redis"):
        await CeleryBackend(config(), nobody).start()
    with pytest.raises(BrokerError, match="redis://"):
        normalise_url("amqp://guest@localhost//")
    assert "ssl_cert_reqs=required" in normalise_url("rediss://:pw@example.org:6380/0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for url, needle in ((wrong, "refused the password"), (nobody, "Cannot reach Redis")):
        out = subprocess.run(
            [sys.executable, "-m", "core", "worker", "--broker", url],
            capture_output=True, text=True, env=env, timeout=WAIT,
        )  # fmt: skip
        assert out.returncode == 2 and needle in out.stderr
        assert stack.server.password not in out.stderr


async def test_tls_broker_with_a_private_ca(tmp_path):
    cert, key, ca = make_certificates(tmp_path)
    args = ("--engine", "tests.fake_engines:by_mode", "--device", "cpu")
    started = celery_stack(tmp_path, 1, *args, tls=(cert, key, ca))
    stack = await asyncio.to_thread(started.__enter__)
    try:
        assert stack.url.startswith("rediss://")
        untrusted = stack.url.split("?")[0]  # certificates are checked: without the CA, refused
        with pytest.raises(BrokerError, match="does not trust"):
            await CeleryBackend(config(), untrusted).start()
        cfg = config(workers=1)
        async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as tls_runner:
            job = await tls_runner.submit(req(), owner="tls")
            assert isinstance(await finish(job), Done)
    finally:
        await asyncio.to_thread(started.__exit__, None, None, None)


async def test_wire_rejects_what_is_not_a_job_or_an_event():
    good = wire.request_to_json(req())
    assert wire.request_from_json(json.loads(json.dumps(good))).content == CONTENT
    for bad in ({}, {**good, "content": 5}, {**good, "content": "!!"}, {**good, "x": 1}):
        with pytest.raises(wire.WireError):
            wire.request_from_json(bad)
    with pytest.raises(SettingsError):
        wire.request_from_json({**good, "settings": {"size": -1}})
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode()
              for k, v in wire.event_to_fields(Done("x", b"png", {"a": (1, 2)}, 1, 2)).items()}  # fmt: skip
    assert wire.event_from_fields(fields, "mine")[0] == Done("mine", b"png", {"a": [1, 2]}, 1, 2)
    for broken in ({b"type": b"Queued", b"json": b"{}"}, {b"type": b"Done", b"json": b"[]"}):
        with pytest.raises(wire.WireError):
            wire.event_from_fields(broken, "x")


@pytest.mark.slow
async def test_the_engine_is_loaded_after_the_fork_only(tmp_path):
    """A process forked after CUDA was initialised cannot use CUDA: the worker's parent never
    imports torch; its child loads the real engine (and warms it up) after the fork."""

    def maps() -> tuple[str, str]:
        with celery_stack(tmp_path, 1, "--backbone", "random", "--device", "cpu") as stack:
            (worker,) = stack.workers
            child = stack.child_pids()[worker.node]
            parent = Path(f"/proc/{worker.process.pid}/maps").read_text()
            return parent, Path(f"/proc/{child}/maps").read_text() + worker.tail()

    parent, child = await asyncio.to_thread(maps)
    assert "libtorch" in child and "libtorch" not in parent
    assert "warm-up done" in child


# ---- load -----------------------------------------------------------------------------------
async def test_fifty_jobs_from_ten_owners_each_end_once(runner, stack):
    jobs = await asyncio.gather(
        *(runner.submit(req(steps=1), owner=f"load-{i % 10}") for i in range(50))
    )
    cancelled = jobs[10::7]
    for job in cancelled:
        await job.cancel()
    streams = await asyncio.wait_for(asyncio.gather(*(collect(job) for job in jobs)), WAIT)
    for job, events in zip(jobs, streams, strict=True):
        terminal = [e for e in events if isinstance(e, TERMINAL_EVENTS)]
        assert len(terminal) == 1 and events[-1] is terminal[0] and job.done
        assert isinstance(terminal[0], JobCancelled if job in cancelled else Done)
    assert {j.result.metadata["pid"] for j in jobs if j.result} == set(stack.child_pids().values())


# ---- machines and Redis going away (last: they replace workers) -----------------------------
async def test_poison_job_fails_once_and_the_worker_carries_on(runner, stack):
    cfg = config(job_timeout=120)  # so only the worker's death can end the job early
    async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as own:
        doomed = await own.submit(req("kill"), owner="poison")
        end = await finish(doomed)
    assert end == Failed(doomed.id, WORKER_LOST)
    stack.wait_ready()
    client = stack.server.client()

    def unacked() -> list[str]:
        return [json.loads(v)[0]["headers"]["id"] for v in client.hvals("unacked")]

    for _ in range(WAIT * 10):  # the worker acknowledges it once it has noticed its child died
        if doomed.id not in unacked():
            break
        await asyncio.sleep(0.1)
    assert doomed.id not in unacked() and client.llen(QUEUE) == 0  # acked, never requeued
    ok = await finish(await runner.submit(req(), owner="poison"))
    assert isinstance(ok, Done)


async def test_sigkilled_worker_fails_its_job_and_the_next_paints_elsewhere(stack):
    cfg = config(job_timeout=120)  # so only the heartbeat can end the job early
    async with Runner(cfg, backend=CeleryBackend(cfg, stack.url)) as runner:
        job = await runner.submit(req(steps=5000), owner="doomed")
        await asyncio.wait_for(first(job, ProgressUpdate), WAIT)
        victim = stack.holder(job.id)
        victim.kill()  # parent and child: the machine is gone
        end = await finish(job)
        assert end == Failed(job.id, WORKER_LOST)
        survivor = stack.child_pids()
        survivor.pop(victim.node, None)
        nxt = await finish(await runner.submit(req(), owner="next"))
        assert isinstance(nxt, Done) and nxt.metadata["pid"] in survivor.values()
    stack.workers.remove(victim)
    stack.add_worker(victim.name)
    stack.wait_ready()


@pytest.mark.parametrize("loses_data", [True, False], ids=["restarted-empty", "connections-cut"])
async def test_redis_outage_mid_run_every_job_ends_once(stack, loses_data, caplog):
    cfg = config(workers=3, job_timeout=60, start_timeout=60)  # 2 painting, 1 in the broker
    backend = CeleryBackend(cfg, stack.url)
    async with Runner(cfg, backend=backend) as runner:
        jobs = [await runner.submit(req(steps=60), owner=f"outage-{i}") for i in range(5)]
        await asyncio.wait_for(first(jobs[0], ProgressUpdate), WAIT)
        await asyncio.wait_for(first(jobs[1], ProgressUpdate), WAIT)
        if loses_data:
            await asyncio.to_thread(stack.server.restart, 1.0)
        else:
            client = stack.server.client()
            client.client_kill_filter(_type="normal", skipme=True)
            client.client_kill_filter(_type="pubsub", skipme=True)
        streams = await asyncio.wait_for(asyncio.gather(*(collect(j) for j in jobs)), WAIT * 2)
        for events in streams:
            assert sum(isinstance(e, TERMINAL_EVENTS) for e in events) == 1
            assert isinstance(events[-1], Done), events[-1]
        stack.wait_ready()
        after = await finish(await runner.submit(req(), owner="after-outage"))
        assert isinstance(after, Done)
    if loses_data:
        assert "Redis lost its data" in caplog.text
    ran = "\n".join(w.log.read_text(errors="replace") for w in stack.workers)
    for job in jobs:  # each painted exactly once, whatever copies Redis handed out
        painted = re.findall(rf"pastiche\.paint\[{job.id}\] succeeded in \S+ 'Done'", ran)
        assert len(painted) == 1, job.id

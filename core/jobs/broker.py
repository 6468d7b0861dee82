"""What the bot's side and the GPU workers agree on about the broker (Celery over Redis).

The Celery app's settings (JSON only, one job per worker process, late acks), the task's name
and queue, the Redis keys that carry one job's events, heartbeat and stop request, and the
connection check that turns a refused password or an unreachable host into a sentence.
Torch-free: the runner imports it too.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from core.errors import PasticheError

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "pastiche.paint"
QUEUE = "pastiche"
BROKER_ENV = "PASTICHE_BROKER_URL"
"""Where the bot, the helper and ``pastiche worker`` look for the broker URL when not given
one (keeps the password out of command lines and configuration files)."""

HEARTBEAT_INTERVAL = 1.0
"""Seconds between a busy worker's heartbeats (and its checks for a stop request)."""
HEARTBEAT_TTL = 5
"""Seconds a heartbeat lives: a worker silent this long is taken for dead and its job fails."""
KEY_TTL = 2 * 24 * 3600
"""Seconds a job's claim and stop keys outlive it, so a copy redelivered later (after the
visibility timeout) is recognised and never painted again."""
STREAM_TTL = 3600
"""Seconds an event stream nobody reads any more is kept."""
VISIBILITY_TIMEOUT = 3 * 3600
"""Seconds before Redis hands an unacknowledged job to another worker. Celery's default is
one hour; it must exceed the longest job (15 minutes by default) or a job still painting is
delivered again. Redelivery only matters for a worker whose machine vanished mid-job, and
its runner has failed that job long before (heartbeats)."""
SCHEMES = ("redis", "rediss")
WORKER_LOST = (
    "The painting engine stopped unexpectedly while working on this job (the machine "
    "painting it stopped responding or ran out of memory). Please try again, perhaps with a "
    "smaller size."
)
"""What the user sees when the process painting their job died."""


class BrokerError(PasticheError):
    """The broker cannot be used: a bad URL, an unreachable host, a refused password."""


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job (the job id is also the Celery task id)."""

    job_id: str

    def _key(self, name: str) -> str:
        return f"pastiche:job:{self.job_id}:{name}"

    @property
    def events(self) -> str:
        """Stream of the job's events, written by the worker, read by the runner."""
        return self._key("events")

    @property
    def sent(self) -> str:
        """Set by the runner when it publishes; gone after a Redis restart lost the data."""
        return self._key("sent")

    @property
    def claim(self) -> str:
        """Which worker took the job (SET NX): a second delivery finds it taken."""
        return self._key("claim")

    @property
    def alive(self) -> str:
        """The painting worker's heartbeat (expires after HEARTBEAT_TTL)."""
        return self._key("alive")

    @property
    def stop(self) -> str:
        """Why the job must stop or never start (cancel, time limit, already ended)."""
        return self._key("stop")

    @property
    def wake(self) -> str:
        """List the runner pushes to on cancel; the worker's heartbeat thread BLPOPs it."""
        return self._key("wake")


def worker_key(node: str) -> str:
    """A worker's presence record (JSON, expires after HEARTBEAT_TTL)."""
    return f"pastiche:worker:{node}"


WORKER_KEYS = "pastiche:worker:*"


def normalise_url(url: str | None) -> str:
    """Check a broker URL; ``rediss://`` without ``ssl_cert_reqs`` gets ``required`` (Celery
    refuses to guess, and certificate checks are the safe default)."""
    if not url:
        raise BrokerError(
            f'No broker URL: set broker = "redis://..." or ${BROKER_ENV} (see docs/SCALING.md).'
        )
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise BrokerError(
            f"The broker URL must look like redis://:PASSWORD@HOST:6379/0 (or rediss:// for "
            f"TLS), got {redact(url)}."
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BrokerError(f"The broker URL {redact(url)} has a bad port.") from None
    if parts.scheme == "rediss":
        query = dict(parse_qsl(parts.query))
        if "ssl_cert_reqs" not in query:
            query["ssl_cert_reqs"] = "required"
            parts = parts._replace(query=urlencode(query))
    return urlunsplit(parts)


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def explain(exc: BaseException, url: str) -> str:
    """A sentence for an operator: why the broker at ``url`` could not be used."""
    from redis import exceptions as rx

    where = redact(url)
    text = str(exc).rstrip(".")
    if urlsplit(url).password is None and isinstance(
        exc, (rx.AuthenticationError, rx.ResponseError)
    ):
        return f"Redis at {where} needs a password; put it in the broker URL ({text})."
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
        return (
            f"Redis at {where} refused the password ({text}). Check the password in the "
            f"broker URL (redis://:PASSWORD@host:port/0)."
        )
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in type(exc).__name__:
        return (
            f"Redis at {where} presented a TLS certificate this machine does not trust "
            f"({text}). Add ?ssl_ca_certs=/path/to/ca.pem to the broker URL for a private CA."
        )
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, OSError)):
        return (
            f"Cannot reach Redis at {where} ({text}). Is it running, and does its firewall "
            f"let this machine in?"
        )
    return f"Redis at {where} answered with an error: {text}."


def client_options() -> dict[str, Any]:
    """Timeouts shared by every Redis client here: fail fast, never hang on a dead host."""
    return {
        "socket_connect_timeout": 5,
        "socket_timeout": 15,  # above every blocking read (XREAD/BLPOP) used here
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def check(url: str) -> None:
    """Ping the broker once; raises BrokerError with a sentence (for start-up)."""
    import redis

    client = redis.Redis.from_url(url, **client_options())
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise BrokerError(explain(exc, url)) from None
    finally:
        client.close()


def make_app(url: str, *, visibility_timeout: float = VISIBILITY_TIMEOUT) -> Celery:
    """The Celery app both sides use; the worker registers the task on it."""
    from celery import Celery

    app = Celery("pastiche", broker=url, set_as_current=False)
    app.conf.update(
        # JSON only: a broker message can never make anyone unpickle anything.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
        # Events come back through Redis streams; Celery keeps no results.
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # One job at a time per worker process, acknowledged once it ends: a worker never
        # holds a second job behind a long one, and an unacknowledged job outlives a crash.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_concurrency=1,
        # A child killed mid-job (out of memory, a poison image) acks its job as failed
        # instead of handing it to the next worker, so it cannot kill them one by one.
        task_reject_on_worker_lost=False,
        task_acks_on_failure=True,
        task_acks_on_timeout=True,
        # The child loads the engine (and warms it up) before it takes a job.
        worker_proc_alive_timeout=600,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": 5,
            "socket_timeout": 15,
            "socket_keepalive": True,
            "health_check_interval": 30,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        # Events for Flower and `celery events` (docs/SCALING.md).
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    if url.startswith("rediss://"):
        app.conf.broker_use_ssl = ssl_options(url)
    return app


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def ssl_options(url: str) -> dict[str, Any]:
    """Celery's ``broker_use_ssl`` from a rediss:// URL's query (redis-py reads the same)."""
    query = dict(parse_qsl(urlsplit(url).query))
    options: dict[str, Any] = {
        "ssl_cert_reqs": _CERT_REQS.get(query.get("ssl_cert_reqs", "required").lower())
    }
    if options["ssl_cert_reqs"] is None:
        raise BrokerError("ssl_cert_reqs in the broker URL must be required, optional or none.")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options


def node_name(name: str | None) -> str:
    """Celery's node name for a worker: ``NAME@HOST`` (NAME defaults to pastiche)."""
    name = name or "pastiche"
    return name if "@" in name else f"{name}@{socket.gethostname()}"

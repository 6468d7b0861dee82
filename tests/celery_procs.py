"""Real Redis and real ``pastiche worker`` processes for the Celery tests and the benchmark.

``RedisServer`` runs Debian's redis-server on 127.0.0.1 at a free port with a password and no
persistence (a restart loses everything: the hardest case for the backend). ``Worker`` runs
``python -m core worker`` in its own session, so SIGKILL can take the whole worker (parent
and child, as when a machine vanishes). Every process started here is stopped by its owner.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
MISSING = (
    "redis-server is not installed (Debian: apt-get install -y redis-server); "
    "the Celery backend tests need a real one."
)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def require_redis_server() -> str:
    """The redis-server binary; without one a test fails in CI ($CI set) and skips elsewhere."""
    import pytest

    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return binary


@contextmanager
def celery_stack(
    workdir: Path, workers: int, *worker_args: str, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[Stack]:
    """A private Redis and ``workers`` running ``pastiche worker``; all stopped on exit."""
    server = RedisServer(workdir, require_redis_server(), tls)
    server.start()
    stack = Stack(server, workdir, list(worker_args))
    try:
        for i in range(1, workers + 1):
            stack.add_worker(f"w{i}")
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


class Stack:
    """The Redis server and the workers of one test module."""

    def __init__(self, server: RedisServer, workdir: Path, worker_args: list[str]) -> None:
        self.server, self.workdir, self.worker_args = server, workdir, worker_args
        self.workers: list[Worker] = []

    @property
    def url(self) -> str:
        return self.server.url

    def add_worker(self, name: str) -> Worker:
        worker = Worker(self.url, name, self.workdir, *self.worker_args)
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float = 120.0) -> dict[str, dict]:
        live = [w for w in self.workers if w.process.poll() is None]
        return wait_for_workers(self.url, live, timeout)

    def child_pids(self) -> dict[str, int]:
        """Node name -> pid of the process that paints (the prefork child)."""
        return {node: record["pid"] for node, record in presence(self.url).items()}

    def holder(self, job_id: str) -> Worker:
        """The worker that claimed a job."""
        claim = self.server.client().get(f"pastiche:job:{job_id}:claim")
        assert claim is not None, f"job {job_id} was never claimed"
        node = claim.decode().split(" ")[0]
        (worker,) = [w for w in self.workers if w.node == node and w.process.poll() is None]
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.stop()
        self.server.stop()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it: (cert, key, ca) files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, issuer: x509.Name | None, signer: Any, key: Any, ca: bool) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("pastiche test CA", None, ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", ca_cert.subject, ca_key, key, ca=False)
    paths = (folder / "server.pem", folder / "server.key", folder / "ca.pem")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    paths[2].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private redis-server; ``url`` carries its password. With ``tls`` (certificate, key
    and CA files) it speaks TLS only, and ``url`` is rediss:// trusting that CA."""

    def __init__(self, workdir: Path, binary: str, tls: tuple[Path, Path, Path] | None = None):
        self.workdir, self.binary, self.tls = workdir, binary, tls
        self.password = secrets.token_hex(8)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            ca = self.tls[2]
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _listen(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        cert, key, ca = self.tls
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no"]  # fmt: skip

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        for _ in range(5):
            if self._spawn():
                return
            self.port = free_port()  # someone took it between our check and the bind
        raise RuntimeError(f"redis-server would not start; see {self.workdir / 'redis.log'}")

    def _spawn(self, timeout: float = 10.0) -> bool:
        self.process = subprocess.Popen(
            [self.binary, *self._listen(), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if self._wait_ready(timeout):
            return True
        self.stop()
        return False

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                self.client().ping()
                return True
            except redis.RedisError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, down: float = 0.0) -> None:
        """Kill it (its data is lost) and start it again on the same port."""
        self.stop()
        time.sleep(down)
        for _ in range(20):
            if self._spawn(5):
                return
            time.sleep(0.2)
        raise RuntimeError("redis-server did not come back on its port")


class Worker:
    """``pastiche worker`` as a subprocess (its log in ``log``)."""

    def __init__(self, url: str, name: str, logdir: Path, *args: str) -> None:
        self.url, self.name = url, name
        self.log = logdir / f"worker-{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "core", "worker", "--broker", url, "--name", name,
                 "--log-level", "INFO", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def node(self) -> str:
        return self.name if "@" in self.name else f"{self.name}@{socket.gethostname()}"

    def kill(self) -> None:
        """SIGKILL the whole worker, parent and child: the machine is gone."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def terminate(self) -> None:
        """Ask for Celery's warm shutdown (the running job, if any, is finished first)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL whatever is left of its process group."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def presence(url: str) -> dict[str, dict]:
    """Live workers' presence records by node name."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match="pastiche:worker:*"))
        found = {}
        for raw in client.mget(keys) if keys else []:
            if raw:
                record = json.loads(raw)
                found[record["node"]] = record
        return found
    finally:
        client.close()


def wait_for_workers(url: str, workers: list[Worker], timeout: float = 120.0) -> dict[str, dict]:
    """Block until every worker's child has loaded its engine and announced itself."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.tail()}")
        try:
            found = presence(url)
        except redis.RedisError:
            found = {}
        if all(w.node in found for w in workers):
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(w.tail() for w in workers)
            raise RuntimeError(f"workers not ready after {timeout:.0f} s:\n{logs}")
        time.sleep(0.1)

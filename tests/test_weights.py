"""core.weights: download into torch's hub cache from a throwaway local server, resolution
order, offline messages, safe loading and checkpoint/architecture mismatches."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from core.engine import weights
from core.engine.backbones import build, random_state_dict
from core.errors import WeightsError


class Unpicklable:
    """A class weights_only loading must refuse (it could run code on load)."""

    def __init__(self) -> None:
        self.x = 1


class Server:
    """Serves ``files`` on 127.0.0.1; ``truncate[path] = n`` sends only n bytes of the body
    but the full Content-Length, then closes the connection; ``stall[path] = s`` waits s
    seconds after those bytes instead."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.truncate.get(self.path, len(body))])
                self.wfile.flush()
                time.sleep(server.stall.get(self.path, 0))
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # clients that hang up on purpose (interrupt tests)

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def add(self, name: str, body: bytes) -> str:
        self.files["/" + name] = body
        return f"{self.base}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real torch cache or a user's PASTICHE_WEIGHTS."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def checkpoint_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def squeeze_bytes() -> bytes:
    return checkpoint_bytes(random_state_dict("squeezenet", seed=3))


def point(
    monkeypatch: pytest.MonkeyPatch, name: str, url: str, sha_prefix: str
) -> weights.WeightSource:
    """Point source ``name`` at ``url`` with torch hub's NAME-HASH.pth file naming."""
    src = dataclasses.replace(
        weights.SOURCES[name],
        url=url,
        filename=f"{name}-{sha_prefix}.pth",
        sha256_prefix=sha_prefix,
    )
    monkeypatch.setitem(weights.SOURCES, name, src)
    return src


def serve_source(server: Server, monkeypatch, name: str, body: bytes) -> weights.WeightSource:
    sha = hashlib.sha256(body).hexdigest()[:8]
    return point(monkeypatch, name, server.add(f"{name}-{sha}.pth", body), sha)


def closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_sources_follow_torch_hub_naming() -> None:
    assert set(weights.SOURCES) == {"vgg19", "vgg19-caffe", "squeezenet"}
    for src in weights.SOURCES.values():
        assert src.url.endswith("/" + src.filename)
        assert len(src.sha256_prefix) == 8 and src.filename.split("-")[-1].startswith(
            src.sha256_prefix
        )
        assert src.arch in {"vgg19", "squeezenet"}
    assert weights.SOURCES["vgg19"].filename == "vgg19-dcbb9e9d.pth"
    assert weights.SOURCES["vgg19-caffe"].normalization == "caffe"
    assert weights.SOURCES["squeezenet"].normalization == "imagenet"


def test_cache_is_torch_hub_checkpoints_under_torch_home(hub: Path) -> None:
    assert weights.cache_dir() == hub
    assert weights.cache_path("vgg19") == hub / "vgg19-dcbb9e9d.pth"


def test_download_into_cache_with_progress_bar(server, monkeypatch, squeeze_bytes, hub, capsys):
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    path = weights.download("squeezenet", progress=True)
    assert path == hub / src.filename
    assert path.read_bytes() == squeeze_bytes
    assert sorted(p.name for p in hub.iterdir()) == [src.filename]  # no temp file left
    assert src.filename in capsys.readouterr().err  # the tqdm bar went to stderr
    build("squeezenet", weights.load_state_dict(path), ["fire2"])
    # Present: no second request, unless forced.
    assert weights.download("squeezenet", progress=False) == path
    assert server.requests == 1
    weights.download("squeezenet", progress=False, force=True)
    assert server.requests == 2
    assert capsys.readouterr().err == ""  # progress=False prints nothing


def test_hash_mismatch_leaves_nothing(server, monkeypatch, squeeze_bytes, hub) -> None:
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    point(monkeypatch, "squeezenet", src.url, "deadbeef")
    with pytest.raises(WeightsError, match="corrupt.*SHA-256.*deadbeef"):
        weights.download("squeezenet", progress=False)
    assert list(hub.iterdir()) == []


def test_force_redownload_with_bad_hash_keeps_the_good_file(
    server, monkeypatch, squeeze_bytes, hub
) -> None:
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    good = weights.download("squeezenet", progress=False)
    server.files["/" + src.filename] = b"tampered" + squeeze_bytes
    with pytest.raises(WeightsError, match="corrupt"):
        weights.download("squeezenet", progress=False, force=True)
    assert good.read_bytes() == squeeze_bytes
    assert [p.name for p in hub.iterdir()] == [src.filename]


def test_connection_dropped_midway_leaves_nothing(server, monkeypatch, squeeze_bytes, hub):
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    server.truncate["/" + src.filename] = len(squeeze_bytes) // 2
    with pytest.raises(WeightsError) as info:
        weights.download("squeezenet", progress=False)
    msg = str(info.value)
    assert "connection closed" in msg and f"of {len(squeeze_bytes)} bytes" in msg
    assert "pastiche weights download squeezenet" in msg
    assert list(hub.iterdir()) == []


def test_stalled_server_times_out_and_leaves_nothing(server, monkeypatch, squeeze_bytes, hub):
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    server.truncate["/" + src.filename] = 1000
    server.stall["/" + src.filename] = 2.0
    monkeypatch.setattr(weights, "TIMEOUT", 0.3)
    with pytest.raises(WeightsError, match="Could not download the squeezenet weights") as info:
        weights.download("squeezenet", progress=False)
    # Without the timeout the server's close after 2 s would read as "connection closed".
    assert "timed out" in str(info.value)
    assert socket.getdefaulttimeout() is None  # the process default is put back
    assert list(hub.iterdir()) == []


def test_http_error_is_reported(server, monkeypatch, hub) -> None:
    point(monkeypatch, "vgg19", server.base + "/missing-12345678.pth", "12345678")
    with pytest.raises(WeightsError, match="HTTP 404"):
        weights.download("vgg19", progress=False)
    assert list(hub.iterdir()) == []


def test_interrupt_midway_removes_temp_file(server, monkeypatch, squeeze_bytes, hub) -> None:
    serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    monkeypatch.setattr(weights, "CHUNK", 4096)
    real_tqdm = weights.tqdm

    seen = []

    class Interrupting(real_tqdm):
        def update(self, n=1):
            seen.append(n)
            if sum(seen) > 8192:
                assert any(p.suffix == ".partial" for p in hub.iterdir())  # mid-download
                raise KeyboardInterrupt
            return super().update(n)

    monkeypatch.setattr(weights, "tqdm", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        weights.download("squeezenet", progress=False)
    assert list(hub.iterdir()) == []


def test_resolve_order_explicit_env_cache(tmp_path, monkeypatch, server, squeeze_bytes, hub):
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(squeeze_bytes)
    env = tmp_path / "env.pth"
    env.write_bytes(squeeze_bytes)
    cached = weights.download("squeezenet", progress=False)
    monkeypatch.setenv(weights.ENV_VAR, str(env))
    assert weights.resolve("squeezenet", str(explicit)) == explicit
    assert weights.resolve("squeezenet") == env
    monkeypatch.delenv(weights.ENV_VAR)
    assert weights.resolve("squeezenet", download=False) == cached == hub / src.filename
    assert server.requests == 1


def test_resolve_downloads_when_missing(server, monkeypatch, squeeze_bytes, hub) -> None:
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    assert weights.resolve("squeezenet", progress=False) == hub / src.filename
    assert server.requests == 1


def test_resolve_missing_explicit_or_env_file_names_it(tmp_path, monkeypatch) -> None:
    with pytest.raises(WeightsError, match="nope.pth.*--weights.*does not exist"):
        weights.resolve("vgg19", str(tmp_path / "nope.pth"))
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsError, match=f"gone.pth.*{weights.ENV_VAR}"):
        weights.resolve("vgg19")
    with pytest.raises(WeightsError, match="folder"):
        weights.resolve("vgg19", str(tmp_path))


def test_resolve_offline_explains_how_to_get_weights(monkeypatch, hub) -> None:
    url = closed_port_url("vgg19-dcbb9e9d.pth")
    point(monkeypatch, "vgg19", url, "dcbb9e9d")
    for kwargs in ({"progress": False}, {"download": False}):
        with pytest.raises(WeightsError) as info:
            weights.resolve("vgg19", **kwargs)
        msg = str(info.value)
        assert "pastiche weights download vgg19" in msg
        assert url in msg and "--weights FILE" in msg and weights.ENV_VAR in msg
    assert not hub.exists() or list(hub.iterdir()) == []


def test_resolve_never_gives_random_or_unknown() -> None:
    with pytest.raises(WeightsError, match="random"):
        weights.resolve("random")
    with pytest.raises(WeightsError, match="vgg19-caffe"):
        weights.resolve("alexnet")


@pytest.mark.parametrize(
    "body",
    [b"", b"this is not a checkpoint", b"PK\x03\x04" + b"\0" * 64],
    ids=["empty", "text", "bad-zip"],
)
def test_load_state_dict_garbage(tmp_path, body) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(body)
    with pytest.raises(WeightsError, match="garbage.pth.*not a usable PyTorch checkpoint"):
        weights.load_state_dict(path)


def test_load_state_dict_refuses_pickled_code_and_non_dicts(tmp_path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"x": Unpicklable()}, evil)
    with pytest.raises(WeightsError, match="evil.pth"):
        weights.load_state_dict(evil)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsError, match="list, not a state dict"):
        weights.load_state_dict(listed)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(WeightsError, match="no weight tensors"):
        weights.load_state_dict(empty)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load_state_dict(tmp_path / "absent.pth")


def test_truncated_checkpoint_file(tmp_path, vgg19_checkpoint) -> None:
    data = vgg19_checkpoint.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pth"):
        weights.load_state_dict(cut)


def test_vgg19_checkpoint_loads_and_builds(vgg19_checkpoint: Path) -> None:
    sd = weights.load_state_dict(vgg19_checkpoint)
    model = build("vgg19", sd, ["relu1_1", "relu2_1"])
    out = model(torch.rand(1, 3, 20, 20))
    assert out["relu2_1"].shape == (1, 128, 10, 10)
    expected = random_state_dict("vgg19", seed=1234)["features.0.weight"]
    assert torch.equal(model.features[0].weight, expected)


def test_wrapped_state_dict_is_unwrapped(tmp_path) -> None:
    inner = random_state_dict("squeezenet", seed=5)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": inner, "epoch": 1}, path)
    loaded = weights.load_state_dict(path)
    assert loaded.keys() == inner.keys()  # the wrapper and its "epoch" are gone
    assert all(torch.equal(loaded[k], v) for k, v in inner.items())  # saved and loaded as is
    model = build("squeezenet", loaded, ["fire2"])
    built = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    assert built and all(torch.equal(v, inner[k]) for k, v in built.items())


def test_wrong_checkpoint_for_architecture(tmp_path, squeeze_bytes, vgg19_checkpoint) -> None:
    path = tmp_path / "squeeze.pth"
    path.write_bytes(squeeze_bytes)
    with pytest.raises(WeightsError, match="not a vgg19 checkpoint"):
        build("vgg19", weights.load_state_dict(path), ["relu1_1"])
    partial = weights.load_state_dict(vgg19_checkpoint)
    del partial["features.34.weight"]
    with pytest.raises(WeightsError, match="lacks 1 of 32"):
        build("vgg19", partial, ["relu1_1"])
    reshaped = weights.load_state_dict(vgg19_checkpoint)
    reshaped["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(WeightsError, match=r"features.0.weight has shape \(64, 3, 5, 5\)"):
        build("vgg19", reshaped, ["relu1_1"])


def test_verify_cached_and_paths(server, monkeypatch, squeeze_bytes, tmp_path, hub) -> None:
    ok, msg = weights.verify("squeezenet")
    assert not ok and "pastiche weights download squeezenet" in msg
    src = serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    path = weights.download("squeezenet", progress=False)
    ok, msg = weights.verify("squeezenet")
    assert ok and "OK" in msg
    assert weights.verify(str(path))[0]
    rotten = bytearray(squeeze_bytes)
    rotten[len(rotten) // 2] ^= 0xFF  # bit rot
    path.write_bytes(bytes(rotten))
    ok, msg = weights.verify("squeezenet")
    assert not ok and "CORRUPT" in msg and src.sha256_prefix in msg and "--force" in msg
    plain = tmp_path / "plain.pth"
    plain.write_bytes(squeeze_bytes)
    ok, msg = weights.verify(str(plain))
    assert ok and "no hash" in msg
    plain.write_bytes(b"junk")
    assert not weights.verify(str(plain))[0]
    assert weights.verify(str(tmp_path / "absent.pth")) == (
        False,
        f"{tmp_path / 'absent.pth'}: no such file.",
    )


def test_status_reports_presence_and_size(server, monkeypatch, squeeze_bytes, hub) -> None:
    rows = {r["name"]: r for r in weights.status()}
    assert set(rows) == set(weights.SOURCES)
    assert not any(r["present"] for r in rows.values())
    assert rows["vgg19"]["path"] == str(hub / "vgg19-dcbb9e9d.pth")
    assert rows["vgg19"]["url"] == weights.SOURCES["vgg19"].url
    serve_source(server, monkeypatch, "squeezenet", squeeze_bytes)
    weights.download("squeezenet", progress=False)
    row = next(r for r in weights.status() if r["name"] == "squeezenet")
    assert row["present"] and row["size"] == len(squeeze_bytes)
    assert row["arch"] == "squeezenet" and row["description"]

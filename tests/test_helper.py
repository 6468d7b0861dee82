"""The GIMP helper's HTTP API, its files, the plug-in's stdlib client and the installer.

Requests that never reach a worker run against helpers whose workers are never started; the
tests that paint share one helper with one real worker (random-weight VGG19, tiny images),
once with the local backend and once with the Celery one (a real Redis and ``pastiche worker``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from core.helper import files as helper_files
from core.helper import server as helper_cli
from core.helper.app import STATE, HelperOptions, HelperState, _settings, create_app
from core.helper.probe import probe
from core.images import read_metadata
from core.jobs import RunnerConfig
from core.settings import QUALITY_ITERATIONS, Settings
from gimp_plugin import install as installer

from .celery_procs import celery_stack
from .conftest import image_bytes, settings_for

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "gimp_plugin" / "pastiche"
module_loop = pytest.mark.asyncio(loop_scope="module")


def _load_client():
    spec = importlib.util.spec_from_file_location(
        "pastiche_client", PLUGIN_DIR / "pastiche_client.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["pastiche_client"] = module
    spec.loader.exec_module(module)
    return module


pc = _load_client()


def _settings_for(checkpoint: Path) -> Settings:
    return settings_for(checkpoint, size=48, iterations=4)


@pytest.fixture
def presets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "waves.png").write_bytes(image_bytes(width=40, height=40, seed=7))
    (folder / "presets.toml").write_text(
        '[[preset]]\nname = "waves"\nfile = "waves.png"\ndescription = "Test waves"\n'
        "strength = 0.8\n\n"
        '[[preset]]\nname = "broken"\nfile = "missing.png"\n',
        encoding="utf-8",
    )
    return folder


@asynccontextmanager
async def quick_helper(tmp_path: Path, **changes: Any) -> AsyncIterator[TestClient]:
    """A helper whose workers are never started (for requests refused before queueing)."""
    opts = dict(token=TOKEN, probe=False, start_workers=False, log_file=tmp_path / "helper.log")
    opts.update(changes)
    client = TestClient(TestServer(create_app(HelperOptions(**opts)), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def _form(content: bytes | None = None, style: bytes | None = None, **fields: str) -> FormData:
    form = FormData()
    if content is not None:
        form.add_field("content", content, filename="content.png", content_type="image/png")
    if style is not None:
        form.add_field("style", style, filename="style.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


# ---- access control ----------------------------------------------------------------------------
async def test_token_is_required(tmp_path: Path) -> None:
    async with quick_helper(tmp_path) as client:
        resp = await client.get("/health")
        assert resp.status == 401
        assert "token" in (await resp.json())["error"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.get("/health", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        resp = await client.get("/health", headers={"Authorization": f"Basic {TOKEN}"})
        assert resp.status == 401
        resp = await client.get("/health", headers=AUTH)
        assert resp.status == 200
        body = await resp.json()
        assert body["ok"] is True and body["version"] and body["pid"] == os.getpid()
        assert body["log_file"] == str(tmp_path / "helper.log")
        assert body["backbone"] == Settings().backbone and body["ready"] is False


async def test_foreign_host_is_refused(tmp_path: Path) -> None:
    async with quick_helper(tmp_path) as client:
        port = client.port
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
            resp = await client.get("/health", headers={**AUTH, "Host": host})
            assert resp.status == 403, host
            assert "127.0.0.1" in (await resp.json())["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            resp = await client.get("/health", headers={**AUTH, "Host": host})
            assert resp.status == 200, host


async def test_oversize_upload_is_413_json(tmp_path: Path) -> None:
    async with quick_helper(tmp_path, max_upload=64 * 1024) as client:
        big = os.urandom(100 * 1024)
        resp = await client.post("/jobs", data=_form(big, image_bytes()), headers=AUTH)
        assert resp.status == 413
        assert "0.0625 MiB" in (await resp.json())["error"]


async def test_bad_requests_are_400_with_a_sentence(tmp_path: Path, presets_dir: Path) -> None:
    png = image_bytes(width=32, height=32)
    async with quick_helper(tmp_path, presets=presets_dir) as client:

        async def error_of(form: FormData | None = None, **kw: Any) -> str:
            resp = await client.post("/jobs", data=form, headers=AUTH, **kw)
            assert resp.status == 400
            message = (await resp.json())["error"]
            assert message.endswith("."), message
            return message

        assert "content" in await error_of(_form(None, png))
        assert "image" in (await error_of(_form(b"this is not an image", png))).lower()
        assert "style" in (await error_of(_form(png, b"GIF89a broken"))).lower()
        assert "Choose a style" in await error_of(_form(png))
        assert "waves" in await error_of(_form(png, preset="nope"))
        assert "JSON object" in await error_of(_form(png, png, settings="[1, 2]"))
        assert "JSON object" in await error_of(_form(png, png, settings="{oops"))
        assert "strength" in await error_of(_form(png, png, settings='{"strength": 2}'))
        assert "Unknown" in await error_of(_form(png, png, settings='{"colour": 1}'))
        assert "weights" in await error_of(_form(png, png, settings='{"weights": "/etc/passwd"}'))
        assert "quality" in await error_of(_form(png, png, quality="ultra"))
        assert "max_memory" in await error_of(_form(png, png, settings='{"max_memory": "9GB"}'))
        assert "multipart" in await error_of(json={"content": "x"})
        # Nothing reached the runner, so no worker was ever started.
        assert client.server.app[STATE].starting is None


async def test_the_size_limit_is_the_helpers_and_health_tells_the_plugin(tmp_path: Path) -> None:
    png = image_bytes(width=32, height=32)
    async with quick_helper(tmp_path, max_size=2000) as client:
        health = await (await client.get("/health", headers=AUTH)).json()
        assert health["max_size"] == 2000
        resp = await client.post(
            "/jobs", data=_form(png, png, settings='{"size": 2001}'), headers=AUTH
        )
        assert resp.status == 400
        assert "at most 2000 px" in (await resp.json())["error"]
    assert HelperOptions(token=TOKEN).max_size == 4096  # print sizes: tiles keep memory bounded
    args = helper_cli.build_parser().parse_args(["--max-size", "6000", "--max-memory", "3GB"])
    assert (args.max_size, args.max_memory) == (6000, "3GB")


def test_full_resolution_paints_at_the_layers_size_up_to_the_limit() -> None:
    assert pc.paint_size("auto", 512, 3000, 2000, 4096) == 3000
    assert pc.paint_size("auto", 512, 6000, 4000, 4096) == 512  # over the limit: scaled up
    assert pc.paint_size("full", 512, 6000, 4000, 4096) == 6000  # the helper will say no
    assert pc.paint_size("size", 512, 3000, 2000, 4096) == 512
    assert pc.paint_size("auto", 512, 300, 200, None) == 300
    with pytest.raises(pc.HelperError, match="resolution"):
        pc.paint_size("huge", 512, 300, 200, None)


async def test_bad_animation_requests_are_400(tmp_path: Path) -> None:
    png = image_bytes(width=32, height=32)

    def frames_form(*frames: bytes, **fields: str) -> FormData:
        form = _form(None, png, **fields)
        for i, data in enumerate(frames):
            form.add_field("frame", data, filename=f"f{i}.png", content_type="image/png")
        return form

    async with quick_helper(tmp_path) as client:

        async def error_of(form: FormData) -> str:
            resp = await client.post("/jobs", data=form, headers=AUTH)
            assert resp.status == 400
            return (await resp.json())["error"]

        other = image_bytes(width=40, height=32)
        assert "same size" in await error_of(frames_form(png, other))
        assert "at least two frames" in await error_of(frames_form(png))
        assert "frame 2" in await error_of(frames_form(png, b"junk"))
        assert "milliseconds" in await error_of(frames_form(png, png, durations="[10]"))
        assert "milliseconds" in await error_of(frames_form(png, png, durations="oops"))
        broken = _clip_gif()[:-60]
        assert "truncated or corrupt" in await error_of(_form(broken, png))
        assert client.server.app[STATE].starting is None


def _clip_gif() -> bytes:
    from core.animation import Animation, encode_animation

    from .test_animation import moving_frames

    return encode_animation(Animation(moving_frames(4, (64, 48)), [70, 80, 90, 100]), "gif")


async def test_unknown_job_is_404(tmp_path: Path) -> None:
    async with quick_helper(tmp_path) as client:
        for method, path in (
            ("GET", "/jobs/abc"),
            ("GET", "/jobs/abc/result"),
            ("DELETE", "/jobs/abc"),
        ):
            resp = await client.request(method, path, headers=AUTH)
            assert resp.status == 404
            assert "no such job" in (await resp.json())["error"]


async def test_styles_lists_presets_and_problems(tmp_path: Path, presets_dir: Path) -> None:
    async with quick_helper(tmp_path, presets=presets_dir) as client:
        resp = await client.get("/styles", headers=AUTH)
        body = await resp.json()
        assert body["styles"] == [{"name": "waves", "description": "Test waves", "strength": 0.8}]
        assert any("broken" in p for p in body["problems"])
        health = await (await client.get("/health", headers=AUTH)).json()
        assert health["styles"] == 1


def test_settings_overlay_defaults_quality_and_client(vgg19_checkpoint: Path) -> None:
    defaults = _settings_for(vgg19_checkpoint)
    state = HelperState(HelperOptions(token=TOKEN, defaults=defaults))
    s = _settings(state, '{"strength": 0.25, "size": 40}', "draft")
    assert (s.strength, s.size, s.iterations) == (0.25, 40, QUALITY_ITERATIONS["draft"])
    assert s.weights == str(vgg19_checkpoint) and s.device == "cpu"
    assert _settings(state, '{"iterations": 3}', "high").iterations == 3
    assert _settings(state, "", None) == defaults


# ---- files: discovery, logging, probe ---------------------------------------------------------
def test_discovery_file_is_owner_only_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "pastiche" / "helper.json"
    old = os.umask(0)
    try:
        helper_files.write_discovery(path, {"url": "http://127.0.0.1:1", "token": "a"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert helper_files.read_discovery(path) == {"url": "http://127.0.0.1:1", "token": "a"}
    assert [p.name for p in path.parent.iterdir()] == ["helper.json"]
    helper_files.remove_discovery(path, token="someone else's")
    assert path.exists()
    helper_files.remove_discovery(path, token="a")
    assert not path.exists()


def test_default_paths_follow_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(helper_files.DISCOVERY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    if sys.platform.startswith("linux"):
        assert (
            helper_files.default_discovery_file() == tmp_path / "xdg" / "pastiche" / "helper.json"
        )
        assert helper_files.default_log_file() == tmp_path / "state" / "pastiche" / "helper.log"
    # The plug-in computes the same path without importing core.
    assert pc.default_discovery_file() == helper_files.default_discovery_file()
    monkeypatch.setenv(helper_files.DISCOVERY_ENV, str(tmp_path / "elsewhere.json"))
    assert (
        pc.default_discovery_file()
        == helper_files.default_discovery_file()
        == tmp_path / "elsewhere.json"
    )


def test_probe_reports_device_and_weights(vgg19_checkpoint: Path, tmp_path: Path) -> None:
    info = probe(_settings_for(vgg19_checkpoint))
    assert info["device"] == "cpu" and info["weights_present"] is True
    assert info["weights_path"] == str(vgg19_checkpoint)
    missing = probe(Settings(weights=str(tmp_path / "nope.pth"), device="cpu"))
    assert missing["weights_present"] is False and "does not exist" in missing["weights_message"]


def test_public_bind_needs_force(capsys: pytest.CaptureFixture[str]) -> None:
    assert helper_cli.main(["--host", "0.0.0.0"]) == 2
    assert "--force-public-bind" in capsys.readouterr().err


def test_celery_backend_needs_a_redis_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert helper_cli.main(["--backend", "celery", "--broker", "http://example.org"]) == 2
    assert "redis://" in capsys.readouterr().err


async def test_serve_writes_discovery_and_exits_when_idle(tmp_path: Path) -> None:
    disc = tmp_path / "helper.json"
    opts = HelperOptions(token=TOKEN, probe=False, start_workers=False, idle_exit=1.0)
    task = asyncio.create_task(
        helper_cli.serve(opts, host="127.0.0.1", port=0, discovery_file=disc)
    )
    for _ in range(200):
        if disc.exists() or task.done():
            break
        await asyncio.sleep(0.05)
    info = json.loads(disc.read_text())
    assert stat.S_IMODE(disc.stat().st_mode) == 0o600
    assert info["token"] == TOKEN and info["pid"] == os.getpid() and info["version"]
    assert info["url"].startswith("http://127.0.0.1:")
    client = pc.HelperClient(info["url"], info["token"])
    assert (await asyncio.to_thread(client.health))["ok"] is True
    await asyncio.wait_for(task, timeout=60)  # idle for 1 s: serve() returns by itself
    assert not disc.exists()


# ---- the plug-in's client (stdlib only) --------------------------------------------------------
async def test_client_reports_the_helpers_messages(tmp_path: Path, presets_dir: Path) -> None:
    async with quick_helper(tmp_path, presets=presets_dir) as server:
        url = str(server.make_url("")).rstrip("/")
        client = pc.HelperClient(url, TOKEN)
        assert [s["name"] for s in await asyncio.to_thread(client.styles)] == ["waves"]
        with pytest.raises(pc.HelperError, match="not a|cannot|image"):
            await asyncio.to_thread(client.submit, b"nope", style=image_bytes(), style_name="x")
        with pytest.raises(pc.HelperError, match="token"):
            await asyncio.to_thread(pc.HelperClient(url, "bad").health)
        # connect() finds it through the discovery file, unless a URL is given explicitly.
        disc = tmp_path / "helper.json"
        helper_files.write_discovery(disc, {"url": url, "token": TOKEN, "pid": 1})
        config = {"discovery_file": str(disc), "helper_command": ["/nonexistent/python"]}
        found = await asyncio.to_thread(pc.connect, config=config, environ={})
        assert found.url == url and found.token == TOKEN
        env = {pc.URL_ENV: "http://127.0.0.1:9", pc.TOKEN_ENV: "x"}
        with pytest.raises(
            pc.HelperError, match=r"127\.0\.0\.1:9 .*comes from \$PASTICHE_HELPER_URL"
        ):
            await asyncio.to_thread(pc.connect, config=config, environ=env)
        config["discovery_file"] = str(tmp_path / "absent.json")
        with pytest.raises(pc.HelperError, match="Cannot start the Pastiche helper"):
            await asyncio.to_thread(pc.connect, config=config, environ={})


def test_connect_without_helper_explains(tmp_path: Path) -> None:
    config = {"discovery_file": str(tmp_path / "none.json")}
    with pytest.raises(pc.HelperError, match="helper-url argument") as err:
        pc.connect(url="http://127.0.0.1:9", token="t", config=config, environ={})
    assert "Cannot reach the Pastiche helper at http://127.0.0.1:9" in str(err.value)
    with pytest.raises(pc.HelperError, match="not running. Start it with `pastiche helper`"):
        pc.connect(config=config, environ={})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(pc.HelperError, match="pastiche gimp install"):
        pc.load_config(tmp_path)
    assert pc.load_config(tmp_path / "missing") == {}


def test_progress_text() -> None:
    assert pc.describe({"state": "queued", "position": 2}) == (
        0.0,
        "Pastiche: waiting in the queue (position 2)…",
    )
    assert pc.describe({"state": "running", "percent": 42.4, "eta": 83}) == (
        0.424,
        "Pastiche: painting… 42% (about 1 min 23 s left)",
    )
    assert (
        pc.describe({"state": "running", "percent": 5, "eta": None})[1] == "Pastiche: painting… 5%"
    )
    assert pc.format_eta(7.4) == "about 7 s left"
    frame = {"state": "running", "percent": 30, "eta": None, "frame": 7, "frames": 24}
    assert pc.describe(frame)[1] == "Pastiche: painting… frame 7 of 24, 30%"
    assert pc.frame_duration("Frame 2 (80ms) (replace)") == 80
    assert pc.frame_duration("Background") == pc.DEFAULT_FRAME_MS == 100


def test_plugin_settings_are_valid_settings() -> None:
    s = Settings.from_dict(pc.job_settings(0.3, 640, True, 0.75))
    assert (s.strength, s.size, s.preserve_colors, s.keep_faces) == (0.3, 640, "luminance", 0.75)
    assert pc.QUALITIES == tuple(QUALITY_ITERATIONS)


# ---- installer ---------------------------------------------------------------------------------
def test_installer_copies_plugin_and_records_helper_command(tmp_path: Path) -> None:
    dest = tmp_path / "plug-ins"
    code = installer.main(
        [
            "--dest",
            str(dest),
            "--helper-args",
            "--weights /w/vgg.pth --device cpu",
            "--discovery-file",
            "/x/helper.json",
            "--idle-exit",
            "60",
        ]
    )
    assert code == 0
    target = dest / "pastiche"
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "pastiche.py",
        "pastiche_client.py",
    ]
    assert os.access(target / "pastiche.py", os.X_OK)
    assert (target / "pastiche.py").read_bytes() == (PLUGIN_DIR / "pastiche.py").read_bytes()
    config = json.loads((target / "config.json").read_text())
    assert config["helper_command"] == [
        sys.executable,
        "-m",
        "core",
        "helper",
        "--weights",
        "/w/vgg.pth",
        "--device",
        "cpu",
    ]
    assert config["discovery_file"] == "/x/helper.json" and config["idle_exit"] == 60
    assert pc.load_config(target) == config
    assert installer.main(["--dest", str(dest), "--uninstall"]) == 0
    assert not target.exists()


def test_installer_url_mode_and_default_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "p"
    args = [
        "--dest",
        str(dest),
        "--no-autostart",
        "--helper-url",
        "http://127.0.0.1:5",
        "--token",
        "t",
    ]
    assert installer.main(args) == 0
    config = json.loads((dest / "pastiche" / "config.json").read_text())
    assert "helper_command" not in config
    assert (config["helper_url"], config["token"]) == ("http://127.0.0.1:5", "t")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        flatpak = tmp_path / ".var/app/org.gimp.GIMP/config/GIMP/3.0/plug-ins"
        native = tmp_path / ".config/GIMP/3.0/plug-ins"
        assert installer.default_dest() == native
        flatpak.parent.mkdir(parents=True)
        assert installer.default_dest() == flatpak  # only the Flatpak GIMP has been run
        native.parent.mkdir(parents=True)
        assert installer.default_dest() == native
        assert installer.default_dest(flatpak=True) == flatpak


@pytest.mark.slow
def test_plugin_starts_the_helper_which_exits_when_idle(tmp_path: Path) -> None:
    disc = tmp_path / "helper.json"
    config = {
        "helper_command": [
            sys.executable,
            "-m",
            "core",
            "helper",
            "--backbone",
            "random",
            "--device",
            "cpu",
            "--log-file",
            str(tmp_path / "helper.log"),
        ],
        "idle_exit": 2,
        "discovery_file": str(disc),
        "start_timeout": 120,
    }
    client = pc.connect(
        config=config, environ={k: v for k, v in os.environ.items() if k != pc.URL_ENV}
    )
    health = client.health()
    assert health["ok"] is True and health["pid"] != os.getpid()
    assert json.loads(disc.read_text())["pid"] == health["pid"]
    for _ in range(1200):  # idle for 2 s: it exits and removes its discovery file
        if not disc.exists():
            break
        import time

        time.sleep(0.1)
    assert not disc.exists()
    assert "idle" in (tmp_path / "helper.log").read_text()


# ---- painting with a real worker ---------------------------------------------------------------
@pytest.fixture(scope="module", params=["local", "celery"])
def backend_options(request, vgg19_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The helper's own worker process, or (opt-in) a ``pastiche worker`` behind a real Redis."""
    if request.param == "local":
        yield {}
        return
    args = ("--weights", str(vgg19_checkpoint), "--device", "cpu")
    with celery_stack(tmp_path_factory.mktemp("celery"), 1, *args) as stack:
        yield {"backend": "celery", "broker": stack.url}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def painter(
    vgg19_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, backend_options
):
    """One helper with one real worker, shared by the tests that paint."""
    presets = tmp_path_factory.mktemp("presets")
    (presets / "waves.png").write_bytes(image_bytes(width=40, height=40, seed=7))
    (presets / "presets.toml").write_text(
        '[[preset]]\nname = "waves"\nfile = "waves.png"\nstrength = 0.8\n', encoding="utf-8"
    )
    opts = HelperOptions(
        token=TOKEN,
        defaults=_settings_for(vgg19_checkpoint),
        presets=presets,
        probe=True,
        runner_config=RunnerConfig(workers=1, max_queue=2, max_per_owner=10),
        **backend_options,
    )
    client = TestClient(TestServer(create_app(opts), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def _wait_state(client: TestClient, job_id: str, states: set[str]) -> dict[str, Any]:
    for _ in range(1200):
        body = await (await client.get(f"/jobs/{job_id}", headers=AUTH)).json()
        if body["state"] in states:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {body}")


@module_loop
async def test_happy_path_returns_a_png(painter: TestClient) -> None:
    content = image_bytes(width=64, height=48, seed=1)
    form = _form(content, image_bytes(width=40, height=40, seed=2), settings='{"strength": 0.7}')
    resp = await painter.post("/jobs", data=form, headers=AUTH)
    assert resp.status == 201, await resp.text()
    job = await resp.json()
    assert job["position"] in (None, 1) and job["style"] == "style"
    early = await painter.get(f"/jobs/{job['id']}/result", headers=AUTH)
    assert early.status == 409 and "not finished" in (await early.json())["error"]
    status = await _wait_state(painter, job["id"], {"done", "failed", "cancelled"})
    assert status["state"] == "done", status
    assert status["percent"] == 100.0 and (status["width"], status["height"]) == (48, 36)
    resp = await painter.get(f"/jobs/{job['id']}/result", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "image/png"
    png = await resp.read()
    assert Image.open(io.BytesIO(png)).size == (48, 36)
    meta = read_metadata(png)
    assert meta["settings"]["strength"] == 0.7 and meta["extra"]["front_end"] == "gimp"
    health = await (await painter.get("/health", headers=AUTH)).json()
    assert health["ready"] is True
    assert health["device"] == "cpu"  # the probe has finished (locally, or asked the broker)
    if health["backend"] == "celery":
        assert "1 remote worker" in health["weights_message"]
    else:
        assert health["backend"] == "local" and health["weights_present"] is True


@module_loop
async def test_a_heic_selfie_keeps_its_face(painter: TestClient) -> None:
    """The helper reads an iPhone's HEIC like the CLI does, passes keep_faces through, and
    reports the face boxes (and any notes) with the finished job."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).crop((103, 16, 343, 256)).save(buf, "HEIF", quality=90)
    form = FormData()
    form.add_field("content", buf.getvalue(), filename="IMG_0001.HEIC", content_type="image/heic")
    form.add_field("style", image_bytes(width=40, height=40, seed=2), filename="s.png")
    form.add_field("settings", '{"keep_faces": 0.9}')
    resp = await painter.post("/jobs", data=form, headers=AUTH)
    assert resp.status == 201, await resp.text()
    job = await resp.json()
    status = await _wait_state(painter, job["id"], {"done", "failed", "cancelled"})
    assert status["state"] == "done", status
    assert len(status["faces"]) == 1 and status["notes"] == []
    png = await (await painter.get(f"/jobs/{job['id']}/result", headers=AUTH)).read()
    meta = read_metadata(png)
    assert meta["settings"]["keep_faces"] == 0.9 and meta["faces"]["boxes"] == status["faces"]


@module_loop
async def test_animation_from_gimp_layers_and_from_a_gif(painter: TestClient) -> None:
    """The plug-in's way (one PNG per layer, durations beside them) through the real worker,
    and a GIF sent as content: each comes back as painted frames with its timing."""
    from core.animation import load_animation

    from .test_animation import moving_frames

    helper = pc.HelperClient(str(painter.make_url("")), TOKEN)
    frames = [_png(f) for f in moving_frames(3, (64, 48))]
    style = image_bytes(width=40, height=40, seed=2)
    settings = {"size": 32, "iterations": 2}
    seen: list[str] = []
    (pngs, durations), label = await asyncio.to_thread(
        pc.run_animation_job, helper, frames, [80, 90, 100], style=style, style_name="art",
        settings=settings, on_progress=lambda f, text: seen.append(text), poll=0.05,
    )  # fmt: skip
    assert label == "art" and durations == [80, 90, 100] and len(pngs) == 3
    assert all(Image.open(io.BytesIO(p)).size == (32, 24) for p in pngs)
    # Which frames show depends on the relay's pacing and the poll's timing: any will do.
    assert any(f"frame {i} of 3" in text for text in seen for i in (1, 2, 3)), seen

    resp = await painter.post("/jobs", data=_form(_clip_gif(), style), headers=AUTH)
    job = await resp.json()
    status = await _wait_state(painter, job["id"], {"done", "failed", "cancelled"})
    assert status["state"] == "done" and status["frames"] == 4, status
    resp = await painter.get(f"/jobs/{job['id']}/result", headers=AUTH)
    assert resp.content_type == "image/gif"
    clip = load_animation(await resp.read())
    assert len(clip) == 4 and clip.durations == [70, 80, 90, 100]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@module_loop
async def test_cancel_a_job(painter: TestClient) -> None:
    form = _form(image_bytes(seed=3), image_bytes(seed=4), settings='{"iterations": 2000}')
    job = await (await painter.post("/jobs", data=form, headers=AUTH)).json()
    await _wait_state(painter, job["id"], {"running"})
    resp = await painter.delete(f"/jobs/{job['id']}", headers=AUTH)
    assert (await resp.json()) == {"id": job["id"], "cancelled": True}
    status = await _wait_state(painter, job["id"], {"done", "failed", "cancelled"})
    assert status["state"] == "cancelled" and "cancelled" in status["error"]
    resp = await painter.get(f"/jobs/{job['id']}/result", headers=AUTH)
    assert resp.status == 409 and "cancelled" in (await resp.json())["error"]
    again = await (await painter.delete(f"/jobs/{job['id']}", headers=AUTH)).json()
    assert again["cancelled"] is False


@module_loop
async def test_orphaned_job_is_cancelled(painter: TestClient) -> None:
    state = painter.server.app[STATE]
    old = state.options.orphan_timeout
    state.options.orphan_timeout = 0.3
    # A long job, so it is cancelled for being orphaned (nobody polls it), not finished.
    form = _form(image_bytes(seed=5), image_bytes(seed=6), settings='{"iterations": 2000}')
    job = await (await painter.post("/jobs", data=form, headers=AUTH)).json()
    try:
        end = await asyncio.wait_for(state.jobs[job["id"]].job.wait(), timeout=120)
    finally:
        state.options.orphan_timeout = old
    assert type(end).__name__ == "JobCancelled"
    status = await (await painter.get(f"/jobs/{job['id']}", headers=AUTH)).json()
    assert status["state"] == "cancelled"


@module_loop
async def test_concurrent_jobs_through_the_plugin_client(painter: TestClient) -> None:
    client = pc.HelperClient(str(painter.make_url("")).rstrip("/"), TOKEN)
    seen: list[str] = []

    def paint(seed: int, **style: Any) -> tuple[bytes, str]:
        return pc.run_job(
            client,
            image_bytes(width=48, height=48, seed=seed),
            settings={"size": 32},
            on_progress=lambda f, text: seen.append(text),
            poll=0.1,
            **style,
        )

    (png_a, label_a), (png_b, label_b) = await asyncio.gather(
        asyncio.to_thread(paint, 10, style=image_bytes(seed=11), style_name="starry_night"),
        asyncio.to_thread(paint, 12, preset="waves"),
    )
    assert (label_a, label_b) == ("starry_night", "waves")
    assert Image.open(io.BytesIO(png_a)).size == Image.open(io.BytesIO(png_b)).size == (32, 32)
    assert png_a != png_b
    assert read_metadata(png_b)["settings"]["strength"] == 0.8  # the preset's strength
    assert any("queue" in t for t in seen) and any("painting" in t for t in seen)


@module_loop
async def test_full_queue_is_429(painter: TestClient) -> None:
    ids, refused = [], []
    for seed in range(4):  # one may run, two may wait (max_queue=2): the rest is refused
        form = _form(image_bytes(width=32, height=32, seed=seed), image_bytes(seed=9))
        resp = await painter.post("/jobs", data=form, headers=AUTH)
        body = await resp.json()
        (ids if resp.status == 201 else refused).append(body)
        if resp.status != 201:
            assert resp.status == 429 and "queue is full" in body["error"]
    assert refused
    for job in ids:
        await painter.delete(f"/jobs/{job['id']}", headers=AUTH)
    for job in ids:
        await _wait_state(painter, job["id"], {"cancelled", "done", "failed"})

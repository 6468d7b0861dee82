"""The ``pastiche`` command: options generated from Settings, style specs, exit codes, progress,
dispatch to the other front ends, and real runs in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from PIL import Image

from core import cli, images
from core.errors import SettingsError
from core.settings import QUALITY_ITERATIONS, Settings
from core.types import Progress
from tests.conftest import make_image

FIELDS = [f for f in dataclasses.fields(Settings) if f.name != "extra"]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    make_image(64, 48, seed=1).save(content)
    make_image(64, 64, seed=2).save(style)
    return {"content": content, "style": style, "out": tmp_path / "out.png"}


def parse(*args: str) -> Settings:
    ns = cli.build_parser().parse_args(["stylize", "c.png", "-s", "s.png", "-o", "o.png", *args])
    return cli.build_settings(ns)


# ---- options from the dataclass --------------------------------------------------------------
def test_defaults_are_the_dataclass_defaults() -> None:
    settings = parse()
    for f in FIELDS:
        expected = 0 if f.name == "preview_every" else getattr(Settings(), f.name)
        assert getattr(settings, f.name) == expected, f.name
    assert settings.extra == {"front_end": "cli"}


def _other_value(f: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words that set field ``f`` to a valid non-default value, and that value."""
    kind, _ = cli._field_kind(typing.get_type_hints(Settings)[f.name])
    flag = "--" + f.name.replace("_", "-")
    default = f.default
    if typing.get_origin(kind) is typing.Literal:
        value = next(c for c in typing.get_args(kind) if c != default)
        return [flag, value], value
    if kind is bool:
        return ([f"--no-{flag[2:]}"], False) if default is True else ([flag], True)
    if typing.get_origin(kind) is tuple:
        if typing.get_args(kind)[0] is float:
            return [flag, "1,2.5"], (1.0, 2.5)
        return [flag, "relu1_1,relu2_1"], ("relu1_1", "relu2_1")
    if kind is int:
        value = 3 if default is None else default + 3
        return [flag, str(value)], value
    if kind is float:
        value = default / 2 if default else 0.5
        return [flag, repr(value)], value
    value = {"device": "cpu", "max_memory": "2GB"}.get(f.name, f"{f.name}.png")
    return [flag, value], value


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_settings_field_is_an_option(field: dataclasses.Field) -> None:
    words, value = _other_value(field)
    assert getattr(Settings(), field.name) != value
    assert getattr(parse(*words), field.name) == value


def test_every_field_has_its_own_help() -> None:
    assert {f.name for f in FIELDS} <= set(cli.FIELD_HELP)


def test_literal_choices_and_types_are_enforced(capsys: pytest.CaptureFixture[str]) -> None:
    for words in (["--optimizer", "sgd"], ["--size", "big"], ["--content-layers", ","]):
        with pytest.raises(SystemExit) as exc:
            parse(*words)
        assert exc.value.code == 2
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_quality_sets_iterations_unless_given() -> None:
    assert parse("--quality", "draft").iterations == QUALITY_ITERATIONS["draft"]
    assert parse("--quality", "high").iterations == QUALITY_ITERATIONS["high"]
    assert parse("--quality", "high", "--iterations", "7").iterations == 7


def test_preview_every_stays_when_a_preview_file_is_wanted() -> None:
    assert parse("--preview", "p.png").preview_every == Settings().preview_every
    assert parse("--preview-every", "4").preview_every == 4


def test_parse_style(tmp_path: Path) -> None:
    assert cli.parse_style("a.png") == ("a.png", 1.0)
    assert cli.parse_style("a.png:2") == ("a.png", 2.0)
    assert cli.parse_style("a.png:.5") == ("a.png", 0.5)
    assert cli.parse_style("a.png:1e-1") == ("a.png", 0.1)
    assert cli.parse_style(r"C:\art\a.png") == (r"C:\art\a.png", 1.0)
    assert cli.parse_style(r"C:\art\a.png:3") == (r"C:\art\a.png", 3.0)
    assert cli.parse_style("night:blue.png") == ("night:blue.png", 1.0)
    odd = tmp_path / "night:2"  # an existing file whose name ends like a weight
    odd.write_bytes(b"x")
    assert cli.parse_style(str(odd)) == (str(odd), 1.0)
    for bad in ("a.png:0", "a.png:-1"):
        with pytest.raises(SettingsError, match="positive number"):
            cli.parse_style(bad)


# ---- in-process runs of main() ---------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "pastiche 0.1.0"


def test_user_errors_exit_2_before_any_work(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["stylize", str(files["content"]), "-s", str(files["style"])]
    assert cli.main([*base, "-o", str(files["out"]), "--size", "5"]) == 2
    assert "pastiche: error: size must be between 16 and 8192, got 5." in capsys.readouterr().err
    assert cli.main([*base, "-o", str(files["out"].with_suffix(".tga"))]) == 2
    assert "'.tga' is not a supported output type" in capsys.readouterr().err
    assert cli.main([*base, "-o", str(files["out"]), "--preview", "p.bmp"]) == 2
    assert "Cannot save 'p.bmp'" in capsys.readouterr().err
    assert cli.main([*base, "-o", str(files["out"].parent / "nope" / "o.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([*base, "-s", f"{files['style']}:0", "-o", str(files["out"])]) == 2
    assert "must be a positive number" in capsys.readouterr().err
    missing = str(files["out"].parent / "missing.png")
    assert cli.main(["stylize", missing, "-s", str(files["style"]), "-o", str(files["out"])]) == 2
    err = capsys.readouterr().err
    assert "content image" in err and "missing.png" in err and "does not exist" in err
    assert cli.main(["stylize", str(files["content"]), "-s", missing, "-o", str(files["out"])]) == 2
    assert "The style image" in capsys.readouterr().err
    assert not files["out"].exists()


def test_unexpected_errors_are_reported_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.engine import weights

    def boom() -> list[dict]:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(weights, "status", boom)
    assert cli.main(["weights", "list"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "Traceback" not in err
    path = Path(err.split("written to ")[1].split(";")[0])
    try:
        assert "Traceback" in path.read_text() and "def boom" not in err
    finally:
        path.unlink()
    assert cli.main(["weights", "list", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.engine import weights

    def interrupted() -> list[dict]:
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "status", interrupted)
    assert cli.main(["weights", "list"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_interrupt_handler_sets_the_stop_flag_then_escalates() -> None:
    before = signal.getsignal(signal.SIGINT)
    with cli._Interrupt() as interrupt:
        assert signal.getsignal(signal.SIGINT) == interrupt._handle
        assert not interrupt.event.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.event.is_set()  # first Ctrl-C: a request, no exception
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def _progress(step: int, preview: Image.Image | None = None) -> Progress:
    return Progress(
        step=step, total_steps=12, scale=2, scales=3, iteration=step, iterations=6, width=45,
        height=34, losses={"total": 0.125}, elapsed=1.0, eta=75.0, preview=preview,
    )  # fmt: skip


def test_progress_bar_and_preview_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preview = tmp_path / "preview.webp"
    bar = cli._ProgressBar(enabled=True, preview=str(preview))
    bar(_progress(3))
    assert not preview.exists()
    bar(_progress(6, preview=make_image(32, 24)))
    bar.close()
    err = capsys.readouterr().err
    assert "6/12" in err and "scale 2/3 45x34" in err and "loss 0.125" in err and "ETA 01:15" in err
    assert images.load_image(preview).size == (32, 24)
    quiet = cli._ProgressBar(enabled=False, preview=None)
    quiet(_progress(1))
    quiet.close()
    assert capsys.readouterr().err == ""


# ---- weights ---------------------------------------------------------------------------------
def test_weights_list_and_verify(
    vgg19_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("vgg19", "vgg19-caffe", "squeezenet"):
        assert name in out
    assert "not downloaded" in out
    assert cli.main(["weights", "verify", str(vgg19_checkpoint)]) == 0
    assert "loads as a checkpoint" in capsys.readouterr().out
    assert cli.main(["weights", "verify", "vgg19"]) == 1
    assert "not downloaded" in capsys.readouterr().err
    assert cli.main(["weights", "download", "alexnet"]) == 2
    assert "pastiche: error:" in capsys.readouterr().err


def test_weights_download_passes_its_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.engine import weights

    calls = []

    def fake(name: str, *, progress: bool = True, force: bool = False) -> Path:
        calls.append((name, progress, force))
        return Path("/cache") / name

    monkeypatch.setattr(weights, "download", fake)
    assert cli.main(["weights", "download", "squeezenet", "--force", "-q"]) == 0
    assert cli.main(["weights", "download", "vgg19"]) == 0
    assert calls == [("squeezenet", False, True), ("vgg19", True, False)]
    assert capsys.readouterr().out.split() == ["/cache/squeezenet", "/cache/vgg19"]


# ---- dispatch to the other front ends --------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "module", "passed"),
    [
        (["bot", "--config", "x.toml"], "bot.__main__", ["--config", "x.toml"]),
        (["helper", "--port", "0"], "core.helper.server", ["--port", "0"]),
        (["gimp", "install", "--dry-run"], "gimp_plugin.install", ["--dry-run"]),
        (["bench", "--quick"], "benchmarks.bench", ["--quick"]),
    ],
)
def test_front_ends_get_the_rest_of_argv(
    argv: list[str], module: str, passed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda args: seen.append(args) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main(argv) == 7
    assert seen == [passed]


def test_missing_front_end_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gimp_plugin.install", None)  # import fails
    assert cli.main(["gimp", "install"]) == 2
    assert (
        "Cannot run `pastiche gimp install`: gimp_plugin.install is missing"
        in capsys.readouterr().err
    )
    monkeypatch.setitem(sys.modules, "discord", None)  # as if discord.py were not installed
    monkeypatch.delitem(sys.modules, "bot.__main__", raising=False)
    assert cli.main(["bot"]) == 2
    err = capsys.readouterr().err
    assert "needs the Python package 'discord'" in err and "pastiche-paint[bot]" in err
    assert cli.main(["gimp", "uninstall"]) == 2
    assert "only gimp command is 'install'" in capsys.readouterr().err


# ---- real runs in a subprocess ---------------------------------------------------------------
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PASTICHE_WEIGHTS"}
    env["TORCH_HOME"] = str(cwd / "torch-home")  # never touch or find a real cache
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_subprocess_user_errors_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad_image = run_cli(
        "stylize", str(text), "--style", str(files["style"]), "-o", "o.png", cwd=tmp_path
    )
    bad_setting = run_cli(
        "stylize", str(files["content"]), "--style", str(files["style"]), "-o", "o.png",
        "--strength", "3", cwd=tmp_path,
    )  # fmt: skip
    bad_ext = run_cli(
        "stylize",
        str(files["content"]),
        "--style",
        str(files["style"]),
        "-o",
        "o.gif",
        cwd=tmp_path,
    )
    for proc, message in [
        (bad_image, "The content image '"),
        (bad_setting, "strength must be between 0 and 1, got 3."),
        (bad_ext, "'.gif' is not a supported output type"),
    ]:
        assert proc.returncode == 2, proc.stderr
        assert "pastiche: error: " in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert "not an image" in bad_image.stderr
    assert not (tmp_path / "o.png").exists()


def _stylize_args(files: dict[str, Path], weights: Path | str, *more: str) -> list[str]:
    return [
        "stylize", str(files["content"]), "--style", str(files["style"]), "-o", str(files["out"]),
        "--weights", str(weights), "--size", "64", "--min-size", "32", "--device", "cpu", *more,
    ]  # fmt: skip


@pytest.mark.slow
def test_subprocess_missing_weights_file_exits_2(files: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(*_stylize_args(files, tmp_path / "nope.pth", "--iterations", "3"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pastiche: error: " in proc.stderr and "nope.pth" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not files["out"].exists()


@pytest.mark.slow
def test_subprocess_stylize_end_to_end(
    files: dict[str, Path], vgg19_checkpoint: Path, tmp_path: Path
) -> None:
    proc = run_cli(*_stylize_args(files, vgg19_checkpoint, "--iterations", "3"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Saved" in proc.stderr and "scale 3/3" in proc.stderr
    with Image.open(files["out"]) as out:
        assert out.format == "PNG" and out.size == (64, 48)
    meta = images.read_metadata(files["out"])
    assert meta is not None
    assert meta["settings"]["size"] == 64 and meta["settings"]["iterations"] == 3
    assert meta["extra"] == {"front_end": "cli", "content": "content.png", "styles": ["style.png"]}


@pytest.mark.slow
def test_subprocess_ctrl_c_stops_within_a_step(
    files: dict[str, Path], vgg19_checkpoint: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PASTICHE_WEIGHTS"}
    args = _stylize_args(files, vgg19_checkpoint, "--iterations", "100000", "--early-stop", "0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen = b""
        while b"scale 1/" not in seen:  # the optimiser is running
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "interrupted; nothing was saved" in err and "Traceback" not in err
    assert not files["out"].exists()


def test_max_memory_takes_amounts_people_write() -> None:
    from core.byte_sizes import format_bytes, parse_bytes

    assert parse("--max-memory", "1.5GB").max_memory == "1.5GB"
    assert Settings().max_memory == "auto"
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("800 MB") == 800_000_000
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512m") == 512_000_000
    assert format_bytes(1.5e9) == "1.5 GB"
    for bad in ("lots", "1.5 GQ", "-1GB", "", "GB"):
        with pytest.raises(SettingsError, match="such as 1.5GB"):
            Settings(max_memory=bad)
    with pytest.raises(SettingsError, match="too small"):
        Settings(max_memory="100MB")
    with pytest.raises(SettingsError, match="max_memory"):
        Settings.from_dict({"max_memory": 2_000_000_000})


@pytest.mark.slow
def test_subprocess_paints_an_animation(
    files: dict[str, Path], vgg19_checkpoint: Path, tmp_path: Path
) -> None:
    from core.animation import Animation, encode_animation, load_animation
    from tests.test_animation import moving_frames

    clip = tmp_path / "clip.gif"
    clip.write_bytes(
        encode_animation(Animation(moving_frames(3, (64, 48)), [80, 90, 100], loop=2), "gif")
    )
    common = [
        "--style", str(files["style"]), "--weights", str(vgg19_checkpoint), "--size", "32",
        "--no-pyramid", "--iterations", "2", "--frame-iterations", "1", "--device", "cpu",
    ]  # fmt: skip
    proc = run_cli("stylize", str(clip), "-o", "painted.gif", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "frame 3/3" in proc.stderr and "(32x24, 3 frames)" in proc.stderr
    painted = load_animation(tmp_path / "painted.gif")
    assert (len(painted), painted.size, painted.durations) == (3, (32, 24), [80, 90, 100])
    assert painted.loop == 2
    with Image.open(tmp_path / "painted.gif") as gif:
        meta = json.loads(gif.info["comment"].decode().split(":", 1)[1])
    assert meta["frames"] == 3 and meta["settings"]["frame_iterations"] == 1

    proc = run_cli("stylize", str(clip), "-o", "few.mp4", "--max-frames", "2", *common,
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    video = load_animation(tmp_path / "few.mp4")
    assert (len(video), video.durations) == (2, [170, 100])  # frames 1 and 3, same length

    proc = run_cli("stylize", str(clip), "-o", "still.jpg", *common, cwd=tmp_path)
    assert proc.returncode == 2 and "'.jpg' is not an animation format" in proc.stderr
    broken = tmp_path / "broken.gif"
    broken.write_bytes(clip.read_bytes()[:-30])
    proc = run_cli("stylize", str(broken), "-o", "b.gif", *common, cwd=tmp_path)
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr

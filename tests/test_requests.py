"""core.requests: one mapping from a front end's request to Settings, and the allowed values of
every choice written once (core.settings' Literal types drive validation and the CLI)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from core.errors import SettingsError
from core.requests import FRONT_END_KEY, request_settings
from core.settings import BACKBONES, QUALITIES, QUALITY_ITERATIONS, Backbone, Settings


def test_quality_sets_iterations_unless_the_user_gave_them() -> None:
    assert request_settings("cli", quality="draft").iterations == QUALITY_ITERATIONS["draft"]
    assert request_settings("gimp", quality=" High ").iterations == QUALITY_ITERATIONS["high"]
    assert request_settings("cli", {"iterations": 7}, quality="high").iterations == 7
    with pytest.raises(SettingsError, match="quality must be one of draft, standard, high"):
        request_settings("gimp", quality="ultra")


def test_preset_strength_applies_unless_the_user_chose_one() -> None:
    assert request_settings("discord", preset_strength=0.8).strength == 0.8
    assert request_settings("discord", {"strength": 0.2}, preset_strength=0.8).strength == 0.2
    assert request_settings("discord").strength == Settings().strength


def test_size_limit_clips_the_default_and_refuses_more() -> None:
    base = Settings(size=900)
    assert request_settings("discord", base=base, max_size=512).size == 512
    assert request_settings("discord", {"size": 300}, base=base, max_size=512).size == 300
    with pytest.raises(SettingsError, match="largest size allowed here is 512 pixels"):
        request_settings("discord", {"size": 600}, base=base, max_size=512)


def test_locked_fields_are_refused_naming_the_service() -> None:
    with pytest.raises(SettingsError, match="device, weights can only be set when the helper"):
        request_settings(
            "gimp", {"weights": "/etc/passwd", "device": "cpu"}, locked={"weights", "device"}
        )


def test_base_options_notes_and_the_one_front_end_key() -> None:
    base = Settings(device="cpu", extra={"operator": "x"})
    s = request_settings(
        "gimp",
        {"style_layers": ["relu1_1", "relu2_1"], "preserve_colors": "stats"},
        base=base,
        notes={"style": "waves"},
    )
    assert s.device == "cpu" and s.preserve_colors == "stats"
    assert s.style_layers == ("relu1_1", "relu2_1")  # JSON lists become tuples
    assert s.extra == {"operator": "x", "style": "waves", FRONT_END_KEY: "gimp"}
    assert FRONT_END_KEY == "front_end" and "frontend" not in s.extra
    with pytest.raises(SettingsError, match="Unknown setting"):
        request_settings("cli", {"colour": 1})


LITERAL_FIELDS = {
    name: typing.get_args(hint)
    for name, hint in typing.get_type_hints(Settings).items()
    if typing.get_origin(hint) is typing.Literal
}


def test_every_choice_field_is_validated_from_its_type_hint() -> None:
    assert set(LITERAL_FIELDS) == {
        "optimizer",
        "style_blend",
        "init",
        "preserve_colors",
        "backbone",
        "precision",
    }
    for name, allowed in LITERAL_FIELDS.items():
        needs = {"init_image": "x.png"} if name == "init" else {}
        for value in allowed:
            assert getattr(Settings(**{name: value}, **needs), name) == value
        with pytest.raises(SettingsError, match=f"{name} must be one of {', '.join(allowed)}"):
            Settings(**{name: "nope"})


def test_named_tuples_of_choices_are_the_literals() -> None:
    assert BACKBONES == typing.get_args(Backbone) == LITERAL_FIELDS["backbone"]
    assert tuple(QUALITY_ITERATIONS) == QUALITIES
    assert {f.name for f in dataclasses.fields(Settings)} >= set(LITERAL_FIELDS)

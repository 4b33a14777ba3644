"""The composition root: flags -> engine objects."""

import pytest

import app
from studio.errors import UnknownPreset
from studio.generation import RequestLimits


def test_public_mode_offers_only_public_presets_with_stricter_limits():
    studio = app.build_studio(app.parse_args(["--public", "--device", "cpu", "--device-budget", "2GiB"]))
    engine = studio.text_to_image
    assert all(preset.public for preset in engine.presets)
    assert engine.limits == RequestLimits.public()
    assert studio.manager.device_budget == 2 * 1024**3


def test_default_preset_flag_and_unknown_preset():
    studio = app.build_studio(app.parse_args(["--preset", "sd-turbo", "--device", "cpu"]))
    assert studio.text_to_image.presets.default == "sd-turbo"
    with pytest.raises(UnknownPreset, match="Unknown preset 'nope'"):
        app.build_studio(app.parse_args(["--preset", "nope", "--device", "cpu"]))


def test_the_ui_builds_with_the_named_endpoint():
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "text_to_image" in api_names

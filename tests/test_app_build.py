"""The composition root: flags -> engine objects."""

import pytest

import app
from studio.errors import UnknownPreset
from studio.generation import RequestLimits


def test_public_mode_narrows_the_presets_to_the_allow_list_with_stricter_limits():
    everything = app.build_studio(app.parse_args(["--device", "cpu"])).text_to_image.presets.names
    studio = app.build_studio(app.parse_args(["--public", "--device", "cpu", "--device-budget", "2GiB"]))
    engine = studio.text_to_image
    public = engine.presets.names
    assert set(public) < set(everything)  # really narrower ...
    assert {"dreamshaper-8", "realistic-vision-5.1", "anything-v5", "lcm-dreamshaper-7"}.isdisjoint(public)
    assert {"embedded", "stable-diffusion-1.5", "sdxl-base-1.0"} <= set(public)  # ... and still useful
    assert engine.limits == RequestLimits.public() and engine.limits.max_upload_pixels < 50_000_000
    assert studio.manager.device_budget == 2 * 1024**3
    assert studio.runner.limiter is not None and studio.runner.limiter.limit == app.PUBLIC_RATE_LIMIT
    assert engine.models.safety_checker_everywhere


def test_default_preset_flag_and_unknown_preset():
    studio = app.build_studio(app.parse_args(["--preset", "sd-turbo", "--device", "cpu"]))
    assert studio.text_to_image.presets.default == "sd-turbo"
    with pytest.raises(UnknownPreset, match="Unknown preset 'nope'"):
        app.build_studio(app.parse_args(["--preset", "nope", "--device", "cpu"]))


def test_the_ui_builds_with_the_named_endpoint():
    demo = app.build_ui(app.build_studio(app.parse_args(["--device", "cpu"])))
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "text_to_image" in api_names
    assert {"arena_battle", "arena_vote", "leaderboard"} <= api_names

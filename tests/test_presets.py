import pytest

from studio.a1111.schedulers import samplers
from studio.core.errors import InvalidRequest, UnknownPreset
from studio.models.families import FAMILIES, family_of, samplers_for
from studio.models.presets import PresetCatalog, StyleCatalog, StylePreset, _preset_from_yaml, load_presets, load_styles


def test_shipped_presets_cover_the_real_models_and_the_embedded_default():
    catalog = load_presets()
    assert catalog.default == "embedded"
    repos = {preset.repo for preset in catalog if preset.repo}
    assert {
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "stabilityai/sd-turbo",
        "Lykon/dreamshaper-8",
        "SG161222/Realistic_Vision_V5.1_noVAE",
        "stablediffusionapi/anything-v5",
        "stabilityai/stable-diffusion-3.5-medium",
        "stabilityai/stable-diffusion-3.5-large",
        "stabilityai/stable-diffusion-3.5-large-turbo",
        "black-forest-labs/FLUX.1-schnell",
        "black-forest-labs/FLUX.1-dev",
    } <= repos
    for name in ("embedded", "embedded-flux"):  # the offline ones, committed in models/
        embedded = catalog.get(name)
        assert embedded.is_local and (embedded.local / "model_index.json").exists(), name


def test_every_preset_is_consistent():
    for preset in load_presets():
        assert preset.family in FAMILIES
        assert preset.default_scheduler in samplers_for(preset), preset.name
        assert all(name in samplers(family_of(preset).flow_matching) for name in samplers_for(preset))
        assert preset.min_size <= preset.default_width <= preset.max_size
        assert 1 <= preset.default_steps <= preset.max_steps
        assert preset.default_width % preset.size_step == 0 and preset.default_height % preset.size_step == 0
        assert preset.description and preset.label


def test_lcm_is_offered_only_to_lcm_models():
    catalog = load_presets()
    assert "LCM" in samplers_for(catalog.get("lcm-dreamshaper-7"))
    assert "LCM" not in samplers_for(catalog.get("stable-diffusion-1.5"))


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(UnknownPreset, match="Unknown preset 'nope'. Available presets: embedded"):
        load_presets().get("nope")


def test_public_allow_list():
    catalog = load_presets().only(["embedded", "sd-turbo"])
    assert catalog.names == ["embedded", "sd-turbo"] and catalog.default == "embedded"
    with pytest.raises(UnknownPreset):
        catalog.get("sdxl-base-1.0")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"family": "sd15", "label": "x", "description": "x"}, "exactly one of 'repo'"),
        ({"repo": "a/b", "local": "c", "family": "sd15", "label": "x", "description": "x"}, "exactly one of"),
        ({"repo": "a/b", "family": "sd4", "label": "x", "description": "x"}, "family must be one of"),
        ({"checkpoint": "flux1-dev.safetensors", "family": "flux", "label": "x", "description": "x"},
         "single-file FLUX.1 checkpoints are not read here yet"),
        ({"repo": "a/b", "family": "sd15", "label": "x", "description": "x", "stepz": 3}, "unknown field"),
        ({"repo": "a/b", "family": "sd15", "label": "x", "description": "x", "default_width": 4096}, "default_width"),
    ],
)
def test_bad_preset_entries_are_refused_with_a_reason(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        _preset_from_yaml("bad", entry, tmp_path)


def test_catalog_refuses_a_missing_default():
    with pytest.raises(ValueError, match="Default preset"):
        PresetCatalog(list(load_presets()), default="missing")


def test_styles_wrap_the_prompt_and_extend_the_negative():
    styles = load_styles()
    assert styles.names[0] == "None"
    assert styles.get("None").apply("a cat", "blurry") == ("a cat", "blurry")
    prompt, negative = styles.get("Pixel art").apply("a cat", "blurry")
    assert prompt.startswith("pixel art of a cat") and negative.startswith("blurry, ")
    assert StylePreset("S", prompt="oil painting").apply("a cat", "") == ("a cat, oil painting", "")


def test_unknown_style_is_refused():
    with pytest.raises(InvalidRequest, match="Unknown style .Vaporwave.. Available styles: None"):
        StyleCatalog([]).get("Vaporwave")


def test_the_flow_presets_say_their_licence_and_flux_dev_its_distilled_guidance():
    catalog = load_presets()
    dev = catalog.get("flux.1-dev")
    assert dev.non_commercial and dev.gated and "Non-Commercial" in dev.licence
    assert (dev.distilled_guidance, dev.inpaint_distilled_guidance, dev.default_guidance) == (3.5, 30.0, 1.0)
    assert dev.inpaint_repo == "black-forest-labs/FLUX.1-Fill-dev"
    schnell = catalog.get("flux.1-schnell")
    assert schnell.licence == "Apache-2.0" and not schnell.gated and schnell.distilled_guidance is None
    for name in ("sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"):
        assert catalog.get(name).gated and "Community License" in catalog.get(name).licence
        assert catalog.get(name).size_step == 16  # the VAE's 8 × the transformer's 2 × 2 patches

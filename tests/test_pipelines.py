"""How presets become diffusers components: shared keys, dedicated inpainting UNets, offline behaviour."""

import pytest
import torch

from studio import pipelines
from studio.errors import ModelUnavailable
from studio.pipelines import DiffusersFactory
from studio.presets import load_presets


@pytest.fixture
def presets():
    return load_presets()


def test_tasks_on_one_base_use_the_same_component_keys(presets):
    factory = DiffusersFactory(torch.device("cpu"))
    preset = presets.get("dreamshaper-8")
    text2img = factory.component_keys(preset, "text2img")
    inpaint = factory.component_keys(preset, "inpaint")
    assert inpaint["unet"] == ("Lykon/dreamshaper-8-inpainting", "unet")  # the dedicated 9-channel UNet
    for role in ("vae", "text_encoder", "tokenizer"):
        assert inpaint[role] == text2img[role] == ("Lykon/dreamshaper-8", role)
    base_only = presets.get("realistic-vision-5.1")  # no inpainting checkpoint: its own UNet, 4-channel path
    assert factory.component_keys(base_only, "inpaint") == factory.component_keys(base_only, "text2img")


def test_sdxl_has_two_text_encoders_and_safety_checker_only_where_asked(presets):
    factory = DiffusersFactory(torch.device("cpu"))
    assert {"text_encoder_2", "tokenizer_2"} <= set(factory.component_keys(presets.get("sdxl-base-1.0"), "text2img"))
    assert "safety_checker" in factory.component_keys(presets.get("stable-diffusion-1.5"), "text2img")
    assert "safety_checker" not in factory.component_keys(presets.get("dreamshaper-8"), "text2img")


def test_unreachable_hub_means_cache_only_loading_with_no_retries(presets, monkeypatch):
    """huggingface_hub would retry a dead connection for ~30 s while the device lock is held."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    seen = {}

    def load_config(source, **kwargs):
        seen.update(kwargs)
        raise OSError(f"{source} is not in the cache")

    monkeypatch.setattr(pipelines.socket, "create_connection", unreachable)
    monkeypatch.setattr(pipelines.DiffusionPipeline, "load_config", load_config)
    factory = DiffusersFactory(torch.device("cpu"))
    preset = presets.get("anything-v5")
    with pytest.raises(ModelUnavailable, match="Preset 'Anything V5' is unavailable.*stablediffusionapi/anything-v5"):
        factory.load_component(preset, (preset.source, "unet"), torch.float32)
    assert seen["local_files_only"] is True


def test_missing_local_folder_is_reported_with_the_fix(tmp_path, presets):
    from dataclasses import replace

    preset = replace(presets.get("embedded"), local=tmp_path / "gone")
    factory = DiffusersFactory(torch.device("cpu"))
    with pytest.raises(ModelUnavailable, match="from the folder .*gone.*python -m studio.embedded train"):
        factory.load_component(preset, (preset.source, "unet"), torch.float32)


def test_embedded_components_load_with_the_manager_dtype(presets):
    factory = DiffusersFactory(torch.device("cpu"))
    preset = presets.get("embedded")
    unet = factory.load_component(preset, (preset.source, "unet"), torch.float16)
    assert next(unet.parameters()).dtype == torch.float16
    assert factory.model_hash(preset) == factory.model_hash(preset) and len(factory.model_hash(preset)) == 10

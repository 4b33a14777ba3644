"""The small-GPU placements of SD 3 and FLUX on the CPU, on a tiny random FLUX: the transformer and T5 stored in
float8 (diffusers' layerwise casting, computed in the model's own dtype) and the transformer's blocks streamed from
RAM (diffusers' group offloading), reached through the stages' own fallbacks when a lease does not fit, recorded in
the manager's books, and giving the plain placement's image (streaming: exactly; float8: within the tolerance
stated below)."""

import numpy as np
import pytest
import torch
import yaml
from tiny_flow_models import save_tiny_flux

from studio.core import memory
from studio.core.errors import OutOfMemoryBudget
from studio.models.loras import LoraCatalog
from studio.models.presets import load_presets
from studio.tasks.engines import local_engines
from studio.tasks.generation import TextToImageRequest

REQUEST = TextToImageRequest(prompt="a red circle", preset="tiny-flux", steps=4, seed=3, width=64, height=64,
                             guidance_scale=1.0, live_preview="Off")
# float8 (e4m3: 3 mantissa bits) rounds each stored weight by up to 1/16 of itself. On this random model, measured on
# seeds 10-13 (not the test's own), the image moved by 0.44-0.46 levels on average and 3 at most (of 255) when this
# was written: the tolerance is 3x that
FLOAT8_MEAN_LEVELS, FLOAT8_MAX_LEVELS = 1.5, 9


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-memory")
    presets = {"default": "tiny-flux", "presets": {"tiny-flux": {
        "label": "Tiny FLUX dev", "local": str(save_tiny_flux(root / "flux")), "family": "flux",
        "distilled_guidance": 3.5, "description": "tiny", "default_width": 64, "default_height": 64,
        "min_size": 32, "max_size": 128, "size_step": 16, "default_scheduler": "Euler"}}}
    (root / "models.yaml").write_text(yaml.safe_dump(presets))
    return root / "models.yaml"


def fresh_engines(presets_file):
    return local_engines(load_presets(presets_file), device_budget=4 * 1024**3, loras=LoraCatalog({}),
                         version="test")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def too_small_unless(manager, monkeypatch, fits):
    """The manager refuses any lease of the transformer or T5 that `fits(storage, in_ram)` says would not fit,
    as a GPU too small for them would: the stages' fallbacks then take over."""
    real_use = manager.use

    def use(keys, working_memory=0, on_device=True, patches=None, dtypes=None, storage=None, in_ram=frozenset()):
        large = {"transformer", "text_encoder_2"} & set(keys)
        if large and not fits(large, storage or {}, in_ram):
            raise OutOfMemoryBudget("Not enough device memory (a test's small GPU).")
        return real_use(keys, working_memory, on_device, patches, dtypes, storage, in_ram)

    monkeypatch.setattr(manager, "use", use)


def test_float8_storage_is_the_fallback_recorded_kept_and_close_to_the_plain_image(presets_file, monkeypatch):
    plain = pixels(fresh_engines(presets_file).text_to_image.generate(REQUEST))
    engines = fresh_engines(presets_file)
    too_small_unless(engines.manager, monkeypatch, lambda large, storage, in_ram: set(storage) >= large)
    stores = []
    real_store = memory.store_in
    monkeypatch.setattr(memory, "store_in", lambda module, storage, compute: (
        stores.append((type(module).__name__, storage, compute)), real_store(module, storage, compute)))
    stored = pixels(engines.text_to_image.generate(REQUEST))
    assert stores == [("T5EncoderModel", torch.float8_e4m3fn, torch.float32),
                      ("FluxTransformer2DModel", torch.float8_e4m3fn, torch.float32)]
    difference = np.abs(stored - plain)
    assert 0 < difference.mean() <= FLOAT8_MEAN_LEVELS and difference.max() <= FLOAT8_MAX_LEVELS, \
        (difference.mean(), difference.max())
    records = {model.component: model for model in engines.manager.status().models}
    # (on the CPU, one tier, the denoise stage's "idle models off" dropped T5 before the transformer was stored)
    assert records["transformer"].dtype == "float8_e4m3fn" and records["vae"].dtype == "float32"
    transformer = engines.manager.loaded_object(engines.models.keys(engines.text_to_image.presets.get("tiny-flux"),
                                                                    "text2img")["transformer"])
    assert records["transformer"].size < sum(p.numel() for p in transformer.parameters()) * 2  # < 2 bytes a weight
    # kept so: the next image (the refusal off) finds the transformer still stored
    monkeypatch.undo()
    engines.text_to_image.generate(REQUEST)
    assert {model.component: model.dtype for model in engines.manager.status().models}["transformer"] == "float8_e4m3fn"


def test_block_streaming_is_the_last_resort_and_gives_the_same_image(presets_file, monkeypatch):
    """Too small even in float8: the transformer's blocks stream from RAM (the float8 storage tried before stays).
    Streaming moves weights, it computes nothing differently: the image is the float8 one exactly."""
    engines = fresh_engines(presets_file)
    too_small_unless(engines.manager, monkeypatch, lambda large, storage, in_ram: set(storage) >= large)
    stored = pixels(engines.text_to_image.generate(REQUEST))
    streamed_engines = fresh_engines(presets_file)
    streams = []
    real_stream = streamed_engines.manager._stream_fn

    def stream(module, device):
        streams.append(type(module).__name__)
        return real_stream(module, device)

    monkeypatch.setattr(streamed_engines.manager, "_stream_fn", stream)
    too_small_unless(streamed_engines.manager, monkeypatch,
                     lambda large, storage, in_ram: "text_encoder_2" in storage if large == {"text_encoder_2"}
                     else "transformer" in in_ram)
    streamed = pixels(streamed_engines.text_to_image.generate(REQUEST))
    assert streams == ["FluxTransformer2DModel"] and np.array_equal(streamed, stored)
    transformer = streamed_engines.manager.loaded_object(
        streamed_engines.models.keys(streamed_engines.text_to_image.presets.get("tiny-flux"), "text2img")["transformer"])
    assert not any(getattr(module, "_diffusers_hook", None) is not None
                   and module._diffusers_hook.get_hook("group_offloading") is not None
                   for module in transformer.modules())  # off every block, not the root only
    assert streamed_engines.manager.status().reserved == 0


def test_plain_block_streaming_changes_nothing_the_model_computes(presets_file):
    engines = fresh_engines(presets_file)
    plain = pixels(engines.text_to_image.generate(REQUEST))
    keys = engines.models.keys(engines.text_to_image.presets.get("tiny-flux"), "text2img")
    with engines.manager.block_streaming({"transformer": keys["transformer"]}, frozenset({"transformer"})) as lease:
        assert lease["transformer"]._diffusers_hook.get_hook("group_offloading") is not None
        assert engines.manager.status().reserved > 0  # its layers outside the blocks and two blocks
    assert engines.manager.status().reserved == 0
    assert np.array_equal(pixels(engines.text_to_image.generate(REQUEST)), plain)


def test_a_lora_on_a_transformer_stored_in_float8_is_refused_and_the_next_image_runs(presets_file, monkeypatch,
                                                                                     tmp_path):
    """PEFT neither merges into float8 weights nor computes its adapters in them: a clear refusal, and the model
    as it was for the next request."""
    from dataclasses import replace

    from tiny_flow_models import save_random_flow_lora

    from studio.core.errors import InvalidRequest
    from studio.models.loras import load_loras

    save_random_flow_lora(presets_file.parent / "flux", tmp_path / "style.safetensors", "kohya")
    engines = fresh_engines(presets_file)
    engines.text_to_image.loras = load_loras(tmp_path, presets_file=None)
    too_small_unless(engines.manager, monkeypatch, lambda large, storage, in_ram: set(storage) >= large)
    stored = pixels(engines.text_to_image.generate(REQUEST))
    with pytest.raises(InvalidRequest, match="transformer is stored in float8 to fit this GPU"):
        engines.text_to_image.generate(replace(REQUEST, prompt="a red circle <lora:style:1>"))
    assert np.array_equal(pixels(engines.text_to_image.generate(REQUEST)), stored)

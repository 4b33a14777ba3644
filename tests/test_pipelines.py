"""How presets become models: shared keys, components from other sources, stages that hold only their own models,
out-of-memory recovery, and an SDXL pipeline split into stages giving the same pixels as diffusers in one call."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from tiny_models import save_tiny_safety_checker, save_tiny_sdxl, save_tiny_vae

from studio.a1111.schedulers import make_scheduler
from studio.core.errors import ModelUnavailable, OutOfMemoryBudget
from studio.core.memory import ModelManager
from studio.core.model_records import ModelKey
from studio.models.components import SAFETY_CHECKER_REPO, DiffusersModels
from studio.models.loading import DiffusersLoader, diffusers_loaders, standalone_key
from studio.models.presets import PresetCatalog, load_presets, load_styles
from studio.models.stages import DiffusionStages
from studio.models.weights import safetensors_bytes, weight_files
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.requests import RequestLimits


@pytest.fixture
def presets():
    return load_presets()


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def sdxl_preset(folder, **changes):
    embedded = load_presets().get("embedded")
    return dataclasses.replace(embedded, name="tiny-sdxl", label="Tiny SDXL", family="sdxl", local=folder,
                               inpaint_local=None, **changes)


def engine_for(*presets, budget=4 * 1024**3, models=None):
    models = models or DiffusersModels(torch.device("cpu"))
    catalog = PresetCatalog(list(presets), presets[0].name)
    manager = ModelManager(diffusers_loaders(models.variant_for(catalog)), "cpu", torch.float32, budget)
    return TextToImage(DiffusionStages(manager, models), catalog, load_styles(), RequestLimits(), version="test")


def test_tasks_on_one_base_use_the_same_keys(presets):
    models = DiffusersModels(torch.device("cpu"))
    preset = presets.get("dreamshaper-8")
    text2img, inpaint = models.keys(preset, "text2img"), models.keys(preset, "inpaint")
    assert inpaint["unet"] == ModelKey("diffusers", "Lykon/dreamshaper-8-inpainting", "unet")
    for role in ("vae", "text_encoder", "tokenizer"):
        assert inpaint[role] == text2img[role] == ModelKey("diffusers", "Lykon/dreamshaper-8", role)


def test_a_preset_takes_a_component_from_another_source(presets):
    models = DiffusersModels(torch.device("cpu"))
    assert models.keys(presets.get("realistic-vision-5.1"), "text2img")["vae"] == standalone_key(
        "vae", "stabilityai/sd-vae-ft-mse")
    assert models.keys(presets.get("sdxl-base-1.0"), "inpaint")["vae"] == standalone_key(
        "vae", "madebyollin/sdxl-vae-fp16-fix")
    # ... and two presets naming the same VAE share one key, so one loaded copy
    other = dataclasses.replace(presets.get("anything-v5"), components={"vae": "stabilityai/sd-vae-ft-mse"})
    assert models.keys(other, "text2img")["vae"] == models.keys(presets.get("realistic-vision-5.1"), "text2img")["vae"]


def test_stages_hold_only_their_own_roles(presets):
    models = DiffusersModels(torch.device("cpu"))
    sdxl = presets.get("sdxl-base-1.0")
    assert set(models.stage_keys(sdxl, "text2img", "encode")) == {"text_encoder", "text_encoder_2", "tokenizer",
                                                                  "tokenizer_2"}
    assert set(models.stage_keys(sdxl, "text2img", "denoise")) == {"unet", "scheduler"}  # latents out: no VAE
    assert set(models.stage_keys(sdxl, "inpaint", "denoise")) == {"unet", "vae", "scheduler"}  # encodes the image
    assert set(models.stage_keys(sdxl, "text2img", "decode")) == {"vae"}


def test_public_mode_puts_a_safety_checker_on_every_preset_but_the_embedded_one(presets):
    public = DiffusersModels(torch.device("cpu"), safety_checker_everywhere=True)
    private = DiffusersModels(torch.device("cpu"))
    for name in ("sdxl-base-1.0", "dreamshaper-8", "sd-turbo"):
        assert public.keys(presets.get(name), "text2img")["safety_checker"] == standalone_key(
            "safety_checker", SAFETY_CHECKER_REPO)
        assert "safety_checker" not in private.keys(presets.get(name), "text2img")
    assert public.keys(presets.get("stable-diffusion-1.5"), "text2img")["safety_checker"].source == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5")  # its own
    assert "safety_checker" not in public.keys(presets.get("embedded"), "text2img")  # draws shapes only


def test_download_requests_fetch_the_variant_and_the_other_sources(presets):
    models = DiffusersModels(torch.device("cuda"))
    requests = {r.source: r for r in models.download_requests(presets.get("sdxl-base-1.0"), "text2img", torch.float16)}
    assert set(requests) == {"stabilityai/stable-diffusion-xl-base-1.0", "madebyollin/sdxl-vae-fp16-fix"}
    base = requests["stabilityai/stable-diffusion-xl-base-1.0"].allow_patterns
    assert "unet/*.fp16.safetensors" in base and "text_encoder_2/config.json" in base and "tokenizer/*" in base
    assert not any(p.startswith("vae/") for p in base)  # the base's own VAE is not fetched
    assert "config.json" in requests["madebyollin/sdxl-vae-fp16-fix"].allow_patterns
    assert "model_index.json" not in requests["madebyollin/sdxl-vae-fp16-fix"].allow_patterns  # it has none
    assert models.download_requests(presets.get("embedded"), "inpaint", torch.float32) == []  # folders only


def test_sizes_are_known_from_the_file_headers_before_loading(presets):
    folder = presets.get("embedded").local / "unet"
    loader = DiffusersLoader()
    unet = loader.load(ModelKey("diffusers", str(presets.get("embedded").local), "unet"), torch.float32)
    measured = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    slack = 64 * 1024  # for buffers a model makes but does not save
    assert safetensors_bytes(weight_files(folder, None), torch.float32) == measured + slack
    assert safetensors_bytes(weight_files(folder, None), torch.float16) == measured // 2 + slack


def test_missing_local_folder_is_reported_with_the_fix(tmp_path):
    with pytest.raises(ModelUnavailable, match="from the folder .*gone.*python -m studio.embedded train"):
        DiffusersLoader().load(ModelKey("diffusers", str(tmp_path / "gone"), "unet"), torch.float32)


def test_embedded_components_load_with_the_manager_dtype(presets):
    preset = presets.get("embedded")
    unet = DiffusersLoader().load(ModelKey("diffusers", preset.source, "unet"), torch.float16)
    assert next(unet.parameters()).dtype == torch.float16
    models = DiffusersModels(torch.device("cpu"))
    assert len(models.model_hash(preset)) == 10
    assert models.model_hash(preset, "inpaint") != models.model_hash(preset)  # the inpainting UNet's own


def test_sdxl_in_stages_matches_diffusers_in_one_call(tiny_sdxl):
    """Encode (two text encoders, pooled embeddings), denoise and decode, each a stage of its own, give the
    pixels diffusers gives when the whole pipeline runs at once."""
    engine = engine_for(sdxl_preset(tiny_sdxl))
    ours = engine.generate(TextToImageRequest(prompt="a red circle", preset="tiny-sdxl", scheduler="Euler", steps=4,
                                              guidance_scale=5.0, width=64, height=64, seed=3))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)  # A1111's Euler, as the studio runs it
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    difference = np.abs(np.asarray(ours.images[0].image, dtype=int) - np.asarray(theirs, dtype=int))
    assert difference.max() <= 1


def test_a_vae_from_another_folder_is_the_one_used(tiny_sdxl, tmp_path):
    own_vae = save_tiny_vae(tmp_path / "other-vae")
    preset = sdxl_preset(tiny_sdxl, components={"vae": str(own_vae)})
    engine = engine_for(preset)
    with_other = engine.generate(TextToImageRequest(prompt="a star", preset="tiny-sdxl", steps=2, seed=1,
                                                    guidance_scale=5.0))
    manager = engine.manager
    assert manager.is_loaded(standalone_key("vae", str(own_vae)))
    assert not manager.is_loaded(ModelKey("diffusers", str(tiny_sdxl), "vae"))
    plain = engine_for(sdxl_preset(tiny_sdxl)).generate(TextToImageRequest(prompt="a star", preset="tiny-sdxl",
                                                                           steps=2, seed=1, guidance_scale=5.0))
    assert not np.array_equal(np.asarray(with_other.images[0].image), np.asarray(plain.images[0].image))


def test_out_of_memory_in_the_decode_is_recovered_with_vae_tiling(presets, monkeypatch):
    engine = engine_for(presets.get("embedded"))
    request = TextToImageRequest(prompt="a red circle on a blue background", steps=4, seed=5, guidance_scale=3.0)
    expected = np.asarray(engine.generate(request).images[0].image)
    vae = engine.manager.loaded_object(ModelKey("diffusers", presets.get("embedded").source, "vae"))
    decode, tiled_calls = vae.decode, []

    def decode_needing_tiles(*args, **kwargs):
        if not vae.use_tiling:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        tiled_calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode_needing_tiles)
    result = engine.generate(request)
    assert tiled_calls and not vae.use_tiling  # tiling was on for the retry, and is off again for others
    assert np.array_equal(np.asarray(result.images[0].image), expected)  # 64 px fits one tile: same pixels


def test_out_of_memory_that_does_not_go_away_gets_a_clear_message(presets, monkeypatch):
    engine = engine_for(presets.get("embedded"))
    request = TextToImageRequest(prompt="a red circle on a blue background", steps=2, seed=5)
    engine.generate(request)

    def always_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    # on the class: the "idle models off the device" attempt reloads the VAE, and the new one must fail too
    monkeypatch.setattr(AutoencoderKL, "decode", always_out_of_memory)
    with pytest.raises(OutOfMemoryBudget, match="Out of memory on cpu in the decode stage, even with idle models"):
        engine.generate(request)
    monkeypatch.undo()
    assert engine.generate(request).images  # and the next request works
    assert engine.manager.status().reserved == 0


def test_a_budget_too_small_for_a_whole_decode_uses_a_tiled_one(tiny_sdxl):
    """The decode stage plans its working memory; when the untiled decode cannot fit, it tiles."""
    preset = sdxl_preset(tiny_sdxl, max_size=1024)
    probe = engine_for(preset)
    stages = probe.stages
    untiled = stages.plan_decode(preset, "text2img", 1024, 1024)
    tiled = stages.plan_decode(preset, "text2img", 1024, 1024, tiled=True)
    assert tiled.working_memory * 3 < untiled.working_memory
    vae_bytes = stages.manager.loaders["diffusers"].size(untiled.keys["vae"], torch.float32)
    budget = vae_bytes + (tiled.working_memory + untiled.working_memory) // 2
    small = engine_for(preset, budget=budget)
    used = []
    original = small.stages.run_stage

    def spy(plan_for, work, can_tile=False):
        def plan_recorder(tiled_flag):
            plan = plan_for(tiled_flag)
            used.append((plan.stage, plan.vae_tiling))
            return plan
        return original(plan_recorder, work, can_tile)

    small.stages.run_stage = spy
    latents = torch.zeros(1, 4, 512, 512)  # a 1024 px image's latents for this VAE (factor 2)
    image = small.stages.decode(preset, "text2img", latents, 1024, 1024)
    assert image.shape[-2:] == (1024, 1024)
    assert ("decode", True) in used
    assert small.manager.status().peak <= budget


@pytest.mark.parametrize("flags_everything", [True, False])
def test_public_mode_never_shows_a_flagged_image(presets, tmp_path, flags_everything):
    """The safety checker runs as a stage of its own; what it flags is replaced by a notice, never shown."""
    checker = save_tiny_safety_checker(tmp_path / "checker", flags_everything)
    preset = dataclasses.replace(presets.get("embedded"), safe_by_construction=False)
    models = DiffusersModels(torch.device("cpu"), safety_checker_everywhere=True, safety_checker_source=str(checker))
    engine = engine_for(preset, models=models)
    result = engine.generate(TextToImageRequest(prompt="a red circle on a blue background", steps=2, seed=4,
                                                batch_size=2))
    assert engine.manager.is_loaded(standalone_key("safety_checker", str(checker)))
    if flags_everything:
        assert result.images == []
        assert [w for w in result.warnings if "flagged" in w] == [
            f"The safety checker flagged the image with seed {seed}; it is not shown." for seed in (4, 5)]
    else:
        assert result.seeds == [4, 5] and not [w for w in result.warnings if "flagged" in w]


def test_model_cpu_offload_the_last_resort_gives_the_same_image(presets):
    """accelerate's model CPU offload (tried on CUDA after the other fallbacks) run here with the CPU as its
    execution device: the stages work with their models left in RAM, and the manager's books stay right."""
    preset = presets.get("embedded")
    models = DiffusersModels(torch.device("cpu"))
    manager = ModelManager({"diffusers": DiffusersLoader()}, "cpu", torch.float32, 4 * 1024**3, two_tiers=True)
    stages = DiffusionStages(manager, models)
    engine = TextToImage(stages, PresetCatalog([preset], "embedded"), load_styles(), RequestLimits(), version="t")
    request = TextToImageRequest(prompt="a red circle on a blue background", steps=4, seed=8, guidance_scale=3.0)
    expected = np.asarray(engine.generate(request).images[0].image)

    def offloaded(plan_for, work, can_tile=False, storable=(), streamable=()):
        return stages._run_offloaded(plan_for(False), work)

    stages.run_stage = offloaded
    result = engine.generate(request)
    assert np.array_equal(np.asarray(result.images[0].image), expected)
    status = manager.status()
    assert status.reserved == 0 and {r.placement for r in status.models} == {"ram"}
    unet = manager.loaded_object(models.keys(preset, "text2img")["unet"])
    assert not hasattr(unet, "_hf_hook")  # accelerate's hooks were removed after the stage


def test_public_mode_checks_sdxl_images_too(tiny_sdxl, tmp_path):
    """SDXL's pipelines have no safety checker of their own: the check stage runs the checker by itself."""
    checker = save_tiny_safety_checker(tmp_path / "checker", flags_everything=True)
    models = DiffusersModels(torch.device("cpu"), safety_checker_everywhere=True, safety_checker_source=str(checker))
    engine = engine_for(sdxl_preset(tiny_sdxl, safe_by_construction=False), models=models)
    result = engine.generate(TextToImageRequest(prompt="a star", preset="tiny-sdxl", steps=2, seed=1,
                                                guidance_scale=5.0))
    assert result.images == [] and "flagged the image with seed 1" in result.warnings[-1]

"""SD 3 and FLUX.1 end to end on tiny random-weight models built here (tests/tiny_flow_models.py), listed in a
presets file and loaded through the preset path as any Hub model is: text to image with the flow samplers,
Hires. fix, inpaint (SD 3's pipeline, FLUX.1 Fill), previews, the PNG fields Forge writes, T5's window."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from conftest import ROOT
from PIL import Image
from tiny_flow_models import save_random_flow_lora, save_tiny_flux, save_tiny_flux_fill, save_tiny_sd3

from studio.a1111.metadata import parse_parameters
from studio.a1111.prompts import a1111_emphasis, parse_attention
from studio.a1111.schedulers import make_scheduler
from studio.a1111.t5_prompts import t5_tokens
from studio.core.errors import InvalidRequest
from studio.core.jobs import LocalJob
from studio.evaluation.compare import CompareLimits, CompareRequest, Comparison
from studio.evaluation.metrics import ClipScorer
from studio.evaluation.model_kinds import CLIP, ClipLoader
from studio.models.loras import LoraCatalog, load_loras
from studio.models.presets import load_presets
from studio.models.upscalers import ReleaseFiles
from studio.tasks.engines import ManagerSettings, build_engines, build_manager
from studio.tasks.generation import TextToImageRequest
from studio.tasks.hires import HiresFix
from studio.tasks.inpainting import InpaintRequest

PROMPT = "a red circle on a blue background"
SIZE = dict(description="a tiny random-weight test model", default_steps=4, default_guidance=3.0,
            default_width=64, default_height=64, min_size=32, max_size=128, size_step=16, default_scheduler="Euler")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux"),
            "schnell": save_tiny_flux(root / "schnell", guidance_embeds=False),
            "fill": save_tiny_flux_fill(root / "fill"), "root": root}


@pytest.fixture(scope="module")
def engines(folders):
    presets = {"default": "tiny-sd3", "presets": {
        "tiny-sd3": {"label": "Tiny SD 3", "local": str(folders["sd3"]), "family": "sd3", **SIZE},
        "tiny-flux": {"label": "Tiny FLUX dev", "local": str(folders["flux"]), "inpaint_local": str(folders["fill"]),
                      "family": "flux", "distilled_guidance": 3.5, "inpaint_distilled_guidance": 30.0,
                      **SIZE | {"default_guidance": 1.0}},
        "tiny-schnell": {"label": "Tiny FLUX schnell", "local": str(folders["schnell"]), "family": "flux",
                         "t5_window": 256, **SIZE | {"default_guidance": 0.0}},
    }}
    path = folders["root"] / "models.yaml"
    presets["presets"]["embedded"] = {"label": "Embedded", "local": str(ROOT / "models" / "embedded-sd"),
                                      "family": "embedded", **SIZE}
    path.write_text(yaml.safe_dump(presets))
    catalog = load_presets(path)
    release = ReleaseFiles(folders["root"] / "release", offline=True)  # the upscalers Hires. fix may use
    manager, models = build_manager(catalog, ManagerSettings(device_budget=4 * 1024**3, dtype=torch.float32,
                                                             extra_loaders={CLIP: ClipLoader()}))
    return build_engines(manager, models, catalog, loras=LoraCatalog({}), release_files=release, version="test")


def generate(engines, **fields):
    request = TextToImageRequest(**(dict(prompt=PROMPT, steps=4, seed=5, width=64, height=64, live_preview="Off")
                                    | fields))
    return engines.text_to_image.generate(request)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def one_call(pipeline_class, folder, **arguments) -> Image.Image:
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=4, height=64, width=64, generator=torch.Generator("cpu").manual_seed(5),
                **arguments).images[0]


def test_sd3_per_stage_image_is_diffusers_one_call_image(engines, folders):
    """Encode, denoise and decode as separate stages on leased models give the image StableDiffusion3Pipeline
    makes in one call (CFG with an empty negative prompt, T5's 256-token window)."""
    ours = generate(engines, preset="tiny-sd3", guidance_scale=3.0).images[0].image
    theirs = one_call(StableDiffusion3Pipeline, folders["sd3"], guidance_scale=3.0)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_flux_per_stage_image_is_diffusers_one_call_image(engines, folders):
    """FLUX.1-dev's way: CFG 1 (true CFG off), the distilled guidance 3.5 as the embedding; T5's 512 tokens,
    CLIP's pooled embedding; the packed latents unpacked before the decode stage."""
    result = generate(engines, preset="tiny-flux", guidance_scale=1.0)
    theirs = one_call(FluxPipeline, folders["flux"], guidance_scale=3.5)
    assert np.abs(pixels(result.images[0].image) - pixels(theirs)).max() <= 1
    fields = parse_parameters(result.images[0].parameters)
    assert fields.extra["Distilled CFG Scale"] == "3.5" and fields.scheduler == "Euler"
    assert "Sampler: Euler, Schedule type: Simple" in result.images[0].parameters


def test_flux_distilled_guidance_and_true_cfg_change_the_image(engines):
    base = pixels(generate(engines, preset="tiny-flux", guidance_scale=1.0).images[0].image)
    distilled = generate(engines, preset="tiny-flux", guidance_scale=1.0, distilled_guidance=8.0).images[0]
    assert np.abs(pixels(distilled.image) - base).max() > 2  # a random tiny model: small, but there
    assert parse_parameters(distilled.parameters).extra["Distilled CFG Scale"] == "8"
    true_cfg = generate(engines, preset="tiny-flux", guidance_scale=4.0, negative_prompt="green").images[0].image
    assert np.abs(pixels(true_cfg) - base).max() > 2


def test_flux_fill_refuses_cfg_and_schnell_reads_256_t5_tokens(engines):
    """FLUX.1 Fill's pipeline takes no negative prompt: CFG above 1 is refused, not ignored. A preset's t5_window
    (FLUX.1 [schnell]'s 256, as Black Forest Labs' reference reads it) is the window T5 reads and the note says."""
    problems = engines.inpainter.problems(InpaintRequest(prompt=PROMPT, preset="tiny-flux", guidance_scale=3.0),
                                          "inpaint")
    assert problems["guidance_scale"] == ("FLUX.1 Fill takes no CFG: set CFG scale to 1 (its Distilled CFG Scale, 30 "
                                          "of its own, guides it).")
    assert "guidance_scale" not in engines.text_to_image.problems(TextToImageRequest(
        prompt=PROMPT, preset="tiny-flux", guidance_scale=3.0, width=64, height=64))  # true CFG in text to image
    schnell = engines.text_to_image.presets.get("tiny-schnell")
    assert schnell.t5_window == 256
    long_prompt = ("a red circle on a blue background, " * 10).strip()  # about 350 T5 tokens here
    notes = [warning for warning in generate(engines, preset="tiny-schnell", prompt=long_prompt).warnings
             if "T5's window" in warning]
    assert notes and "window of 256 tokens" in notes[0]
    assert not [w for w in generate(engines, preset="tiny-flux", prompt=long_prompt).warnings if "T5's window" in w]


def test_schnell_takes_no_distilled_guidance_and_writes_none(engines):
    image = generate(engines, preset="tiny-schnell", guidance_scale=0.0, distilled_guidance=9.0).images[0]
    assert "Distilled CFG Scale" not in image.parameters
    same = generate(engines, preset="tiny-schnell", guidance_scale=0.0).images[0]
    assert np.array_equal(pixels(image.image), pixels(same.image))  # the embedding is not there to take it


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_every_flow_sampler_runs_and_is_written_as_forge_writes_it(engines, preset):
    images = {}
    for sampler in ("Euler", "DPM++ 2M", "UniPC"):
        made = generate(engines, preset=preset, scheduler=sampler).images[0]
        fields = parse_parameters(made.parameters)
        assert fields.scheduler == sampler and f"Sampler: {sampler}, Schedule type: Simple" in made.parameters
        images[sampler] = pixels(made.image)
    assert not np.array_equal(images["Euler"], images["DPM++ 2M"])
    assert not np.array_equal(images["DPM++ 2M"], images["UniPC"])


def test_noise_prediction_samplers_are_refused_for_flow_models(engines):
    problems = engines.text_to_image.problems(TextToImageRequest(prompt=PROMPT, preset="tiny-flux",
                                                                 scheduler="DPM++ 2M Karras", width=64, height=64))
    assert problems["scheduler"] == ("Scheduler 'DPM++ 2M Karras' does not work with Tiny FLUX dev. Choose one of: "
                                     "Euler, DPM++ 2M, UniPC.")


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "UniPC"])
def test_a_shift_of_the_users_is_the_same_at_every_size(sampler):
    """Shift s maps sigma to s·σ / (1 + (s − 1)·σ) for SD 3's fixed schedule and FLUX's size-dependent one alike
    (FLUX's pipeline passes mu from the image's size: with a user's shift, mu is log(s) at every size)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
                   "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                   "num_train_timesteps": 1000}
    sd3_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    expected = [2 * s / (1 + s) for s in (1.0, 0.75, 0.5, 0.25)]
    for config in (flux_config, sd3_config):
        scheduler = make_scheduler(sampler, config, flow=True, shift=2.0)
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(4096, scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift"),
                                 scheduler.config.get("max_shift"))
        if sampler == "Euler":
            scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
        else:
            scheduler.set_timesteps(4, mu=mu)
        assert np.allclose(scheduler.sigmas[:4].numpy(), expected, atol=2e-3), (config, scheduler.sigmas)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "UniPC"])
@pytest.mark.parametrize("shift", [None, 2.0])
def test_a_static_shift_ignores_the_mu_fluxs_pipelines_always_pass(sampler, shift):
    """A FLUX-shaped model with a static shift (the embedded flow model's, SD 3's kind of schedule): FluxPipeline
    passes mu from the image's size all the same; every sampler ignores it, as FlowMatchEulerDiscreteScheduler does
    (DPM++ 2M asserted dynamic shifting when given one)."""
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": False,
              "num_train_timesteps": 1000}
    sigmas = []
    for mu in (None, 0.7):
        scheduler = make_scheduler(sampler, config, flow=True, shift=shift)
        scheduler.set_timesteps(4, mu=mu)
        sigmas.append(scheduler.sigmas.numpy())
    assert np.array_equal(*sigmas)
    own = make_scheduler(sampler, config, flow=True, shift=shift or 3.0)  # no shift of the user's: the config's 3
    own.set_timesteps(4)
    assert np.allclose(own.sigmas.numpy(), sigmas[0])


def test_shift_changes_the_image_and_is_written(engines):
    for preset in ("tiny-sd3", "tiny-flux"):
        own = generate(engines, preset=preset).images[0]
        shifted = generate(engines, preset=preset, shift=1.0).images[0]
        assert "Shift" not in own.parameters and parse_parameters(shifted.parameters).extra["Shift"] == "1"
        assert np.abs(pixels(own.image) - pixels(shifted.image)).max() > 2
    problems = engines.text_to_image.problems(TextToImageRequest(prompt=PROMPT, preset="tiny-sd3", shift=-2,
                                                                 width=64, height=64))
    assert problems["shift"] == "Shift must be above 0 and at most 20, or 0 for the model's own (got -2)."


def test_t5_reads_a1111_weights_as_forge_does(folders):
    """A weighted word's T5 states are scaled by its weight, then the whole window back to its mean (A1111's
    "Original" emphasis, Forge's default for T5); an unweighted prompt's tokens are the tokenizer's own."""
    pipe = FluxPipeline.from_pretrained(folders["flux"])
    plain = t5_tokens(pipe.tokenizer_2, parse_attention("a red circle"), 512)
    assert plain.ids == pipe.tokenizer_2("a red circle", padding="max_length", max_length=512).input_ids
    weighted = t5_tokens(pipe.tokenizer_2, parse_attention("a (red:1.5) circle"), 512)
    assert 1.5 in weighted.weights and weighted.ids == plain.ids
    with torch.inference_mode():
        z = pipe.text_encoder_2(torch.tensor([weighted.ids]))[0]
        emphasised = weighted.encode(pipe.text_encoder_2, torch.device("cpu"))
    assert torch.allclose(emphasised, a1111_emphasis(z, torch.tensor(weighted.weights)))
    assert torch.isclose(emphasised.mean(), z.mean(), atol=1e-6) and not torch.allclose(emphasised, z)


def test_a_prompt_past_t5s_window_is_cut_with_a_note(engines):
    long_prompt = ("a red circle on a blue background, " * 20).strip()  # about 700 T5 tokens here
    result = generate(engines, preset="tiny-sd3", prompt=long_prompt)
    notes = [warning for warning in result.warnings if "T5's window" in warning]
    assert len(notes) == 1 and notes[0].startswith("The prompt is longer than T5's window of 256 tokens: its last ")
    assert result.images  # the image is made from the first 256 tokens


def test_sizes_the_model_cannot_take_are_refused_with_its_step(engines):
    problems = engines.text_to_image.problems(TextToImageRequest(prompt=PROMPT, preset="tiny-flux", width=72,
                                                                 height=64))
    assert problems["width"] == "Width must be a multiple of 16 between 32 and 128 for Tiny FLUX dev (got 72)."


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("upscaler", ["Latent", "lanczos"])
def test_hires_fix_runs_its_second_pass_at_twice_the_size(engines, preset, upscaler):
    """The latents enlarged (FLUX's unpacked first), or the image by an upscaler, then image to image."""
    result = generate(engines, preset=preset, hires=HiresFix(upscale=2.0, upscaler=upscaler, steps=2,
                                                             denoising_strength=0.5))
    image = result.images[0]
    assert image.image.size == (128, 128) and not result.warnings
    assert parse_parameters(image.parameters).extra["Hires upscaler"] in ("Latent", "Lanczos")


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "UniPC"])
def test_the_flow_solvers_run_image_to_image_and_inpaint_too(engines, preset, sampler):
    """The image-to-image and inpaint pipelines noise the init latents with `scale_noise` and FLUX's pass their own
    sigmas: the multistep solvers on flow sigmas take both (Hires. fix's second pass, FLUX Fill, SD 3's inpaint)."""
    hires = generate(engines, preset=preset, scheduler=sampler,
                     hires=HiresFix(upscale=1.5, upscaler="Latent", steps=2, denoising_strength=0.6))
    assert hires.images[0].image.size == (96, 96)
    picture, mask = Image.new("RGB", (64, 64), (40, 90, 200)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for strength in (1.0, 0.6):
        request = InpaintRequest(prompt=PROMPT, preset=preset, scheduler=sampler, steps=4, seed=2, strength=strength,
                                 mask_blur=0, live_preview="Off", guidance_scale=1.0)
        out = pixels(engines.inpainter.inpaint(picture, mask, request).images[0].image)
        assert np.array_equal(out[:8], pixels(picture)[:8]) and np.abs(out[28:36, 28:36] - 40).max() > 0


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_inpaint_repaints_the_mask_only(engines, preset):
    """SD 3 inpaints with its own model (its pipeline blends the known region at each step); FLUX.1-dev with its
    Fill model (conditioned on the masked image and the mask), at its own distilled guidance (30)."""
    picture = Image.new("RGB", (64, 64), (40, 90, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = InpaintRequest(prompt=PROMPT, preset=preset, steps=4, seed=2, strength=1.0, mask_blur=0,
                             live_preview="Off", guidance_scale=1.0 if preset == "tiny-flux" else 3.0)
    result = engines.inpainter.inpaint(picture, mask, request)
    out = pixels(result.images[0].image)
    assert np.array_equal(out[:8], pixels(picture)[:8])  # the input's own pixels outside the mask
    assert np.abs(out[28:36, 28:36] - pixels(picture)[28:36, 28:36]).max() > 8
    if preset == "tiny-flux":
        assert parse_parameters(result.images[0].parameters).extra["Distilled CFG Scale"] == "30"


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_previews_show_the_clean_estimate_unpacked_and_cost_the_image_nothing(engines, preset, sampler):
    shown = []
    request = TextToImageRequest(prompt=PROMPT, preset=preset, scheduler=sampler, steps=4, seed=5, width=64,
                                 height=64, live_preview="Fast", preview_every=1, guidance_scale=1.0)
    with engines.text_to_image.model_files(engines.text_to_image.plan(request)) as plan:
        watched = engines.text_to_image.run(plan, LocalJob(on_preview=lambda image, part: shown.append(image)))
    assert len(shown) == 4 and all(image.size == (32, 32) for image in shown)  # a pixel per latent (VAE ÷ 2)
    unwatched = generate(engines, preset=preset, scheduler=sampler, guidance_scale=1.0)
    assert np.array_equal(pixels(watched.images[0].image), pixels(unwatched.images[0].image))
    # each preview is the clean estimate x0 (Euler: x - sigma v at the step's own sigma): at the last step it is
    # the finished latents, so the last preview is the finished image's own Fast preview
    with engines.text_to_image.model_files(engines.text_to_image.plan(request)) as plan:
        finished = engines.text_to_image._denoise(plan, engines.text_to_image.stages.encode(
            plan.preset, plan.task, plan.encoder_prompt, "", 1.0)[0], 0, LocalJob())[0]
    from studio.models.families import family_of
    from studio.tasks.previews import latents_preview

    expected = pixels(latents_preview(family_of(plan.preset), finished))
    assert np.abs(pixels(shown[-1]) - expected).max() <= 1


def test_on_a_gpu_sd3_and_flux_load_in_bfloat16_and_the_others_in_float16(engines):
    """The manager's dtype on CUDA is float16; SD 3 and FLUX (trained in bfloat16; T5-XXL overflows float16) load
    their every component in bfloat16, their VAE decodes in it; SD 1.x stays float16."""
    import torch

    from studio.models.presets import load_presets as load_default_presets

    presets = [*engines.text_to_image.presets, *load_default_presets()]
    dtype_for = engines.models.dtype_for(presets)
    flux = engines.text_to_image.presets.get("tiny-flux")
    for task in ("text2img", "inpaint"):
        for role, key in engines.models.keys(flux, task).items():
            assert dtype_for(key, torch.float16) == torch.bfloat16, role
    sd15 = load_default_presets().get("stable-diffusion-1.5")
    assert {dtype_for(key, torch.float16) for key in engines.models.keys(sd15, "text2img").values()} == {torch.float16}
    assert dtype_for(engines.models.keys(flux, "text2img")["transformer"], torch.float32) == torch.float32


@pytest.fixture(scope="module")
def flow_loras(folders):
    """Random LoRAs for the tiny FLUX in the three layouts FLUX LoRAs come in, one for the tiny SD 3, and the
    embedded model's own (an SD-shaped LoRA), as a loras/ folder would list them."""
    root = folders["root"] / "loras"
    for layout in ("diffusers", "kohya", "xlabs"):
        save_random_flow_lora(folders["flux"], root / f"flux-{layout}.safetensors", layout, seed=1)
    save_random_flow_lora(folders["sd3"], root / "sd3-style.safetensors", "diffusers", seed=2)
    (root / "shapes.safetensors").write_bytes((ROOT / "loras" / "hexagon.safetensors").read_bytes())
    return load_loras(root, presets_file=None)


def test_flux_loras_in_each_layout_change_the_image_and_leave_nothing_behind(engines, flow_loras, monkeypatch):
    """diffusers', kohya's and XLabs' FLUX LoRAs, converted by diffusers, merged into the transformer for the image
    and taken out after it: the next image without them is the plain one, bit for bit."""
    monkeypatch.setattr(engines.text_to_image, "loras", flow_loras)
    plain = pixels(generate(engines, preset="tiny-flux").images[0].image)
    for name in ("flux-diffusers", "flux-kohya", "flux-xlabs"):
        made = generate(engines, preset="tiny-flux", prompt=f"{PROMPT} <lora:{name}:1>").images[0]
        assert np.abs(pixels(made.image) - plain).max() > 2, name
        assert parse_parameters(made.parameters).extra["Lora hashes"].startswith(f"{name}: ")
    assert np.array_equal(pixels(generate(engines, preset="tiny-flux").images[0].image), plain)
    sd3 = generate(engines, preset="tiny-sd3", prompt=f"{PROMPT} <lora:sd3-style:0.8>").images[0]
    assert np.abs(pixels(sd3.image) - pixels(generate(engines, preset="tiny-sd3").images[0].image)).max() > 2


def test_a_lora_is_checked_against_the_models_family(engines, flow_loras, monkeypatch):
    """A LoRA's keys say what it was made for: FLUX's blocks, SD 3's, or only blocks both have (a diffusers file
    of either fits both flow families), else the text-embedding width its UNet layers read."""
    from studio.models.loras import ANY_TRANSFORMER

    assert [flow_loras.get(name).made_for for name in flow_loras.names] == \
        ["flux", "flux", "flux", ANY_TRANSFORMER, 64]  # (flux-diffusers, -kohya, -xlabs, sd3-style, shapes)
    engine = engines.text_to_image
    monkeypatch.setattr(engine, "loras", flow_loras)
    assert engine.loras_that_fit("tiny-flux") == ["flux-diffusers", "flux-kohya", "flux-xlabs", "sd3-style"]
    assert engine.loras_that_fit("tiny-sd3") == ["sd3-style"]
    assert engine.loras_that_fit("embedded") == ["shapes"]
    with pytest.raises(InvalidRequest, match="LoRA 'shapes' was made for the embedded model; Tiny FLUX dev is "
                                             "FLUX.1. Pick a LoRA made for this model's family"):
        generate(engines, preset="tiny-flux", prompt=f"{PROMPT} <lora:shapes:1>")
    with pytest.raises(InvalidRequest, match="LoRA 'flux-kohya' was made for FLUX.1; Embedded is the embedded model"):
        generate(engines, preset="embedded", prompt=f"{PROMPT} <lora:flux-kohya:1>")
    with pytest.raises(InvalidRequest, match="LoRA 'flux-xlabs' was made for FLUX.1; Tiny SD 3 is SD 3.x"):
        generate(engines, preset="tiny-sd3", prompt=f"{PROMPT} <lora:flux-xlabs:1>")


def test_a_lora_in_a_layout_diffusers_does_not_convert_is_refused_not_ignored(engines, folders, monkeypatch):
    """SD 3's kohya layout (lora_unet_joint_blocks_…): diffusers 0.42 does not convert it, and its layers would
    match nothing; the image must not silently come without it."""
    from safetensors.torch import save_file

    from studio.core.errors import ModelUnavailable

    root = folders["root"] / "kohya-sd3"
    root.mkdir(exist_ok=True)
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 4),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)},
              str(root / "sd3-kohya.safetensors"))
    monkeypatch.setattr(engines.text_to_image, "loras", load_loras(root, presets_file=None))
    with pytest.raises(ModelUnavailable, match="diffusers does not convert this LoRA's layout"):
        generate(engines, preset="tiny-sd3", prompt=f"{PROMPT} <lora:sd3-kohya:1>")


def test_compare_mixes_families_each_cell_at_its_presets_defaults_and_loads_grouped(engines):
    """A preset axis over SD 1.x (the embedded model), SD 3 and FLUX: each cell runs its preset's own sampler,
    steps, CFG and size (FLUX.1-dev's distilled guidance too), the cells of one preset one after another."""
    comparison = Comparison(engines.text_to_image, ClipScorer(engines.manager, ROOT / "models" / "embedded-clip",
                                                              "embedded CLIP"), CompareLimits(max_cells=16))
    request = CompareRequest(prompt=PROMPT, seed=4, x_type="Preset", x_values="tiny-flux, embedded, tiny-sd3",
                             y_type="Seed", y_values="4, 5")
    plan = comparison.plan(request)
    assert [cell_plan.preset.name for cell_plan in plan.plans] == ["tiny-flux"] * 2 + ["embedded"] * 2 + ["tiny-sd3"] * 2
    result = comparison.compare(request)
    assert len(result.cells) == 6 and not result.interrupted
    for cell in result.cells:
        fields = parse_parameters(cell.image.parameters)
        assert ("Distilled CFG Scale" in fields.extra) == (fields.model == "tiny-flux")
        assert ("Schedule type: Simple" in cell.image.parameters) == (fields.model != "embedded")


def test_a_pngs_flow_settings_fill_the_forms_back(engines):
    """Forge's fields read back: the sampler (Simple schedule), Shift and Distilled CFG Scale; into Inpaint, a text
    to image's distilled guidance (its base model's) is left to the inpainting model's own."""
    from studio.tasks.inpainting import inpaint_request_from_parameters
    from studio.tasks.parameters import request_from_parameters

    made = generate(engines, preset="tiny-flux", scheduler="UniPC", shift=2.0, distilled_guidance=5.0).images[0]
    filled, notes = request_from_parameters(made.parameters, engines.text_to_image.presets,
                                            TextToImageRequest(prompt="", preset="tiny-sd3"))
    assert (filled.preset, filled.scheduler, filled.shift, filled.distilled_guidance) == ("tiny-flux", "UniPC", 2.0, 5.0)
    assert not notes
    inpaint, _ = inpaint_request_from_parameters(made.parameters, engines.inpainter.presets,
                                                 InpaintRequest(prompt="", preset="tiny-sd3"))
    assert inpaint.distilled_guidance is None and inpaint.shift == 2.0


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_soft_inpainting_and_outpainting_run_on_flow_models(engines, preset, sampler):
    """Soft inpainting blends the original in at each step on flow sigmas too (FLUX's latents unpacked for it and
    packed back), keeps every pixel outside the blurred mask, and gives another image than the hard mask;
    an outpaint grows the canvas."""
    from studio.tasks.outpainting import Outpaint
    from studio.tasks.soft_inpainting import SoftInpainting

    picture, mask = Image.new("RGB", (64, 64), (40, 90, 200)), Image.new("L", (64, 64), 0)
    picture.paste((200, 40, 40), (8, 8, 30, 30))
    mask.paste(255, (16, 16, 48, 48))
    request = InpaintRequest(prompt=PROMPT, preset=preset, scheduler=sampler, steps=4, seed=2, mask_blur=4,
                             live_preview="Off", guidance_scale=1.0)
    hard = pixels(engines.inpainter.inpaint(picture, mask, request).images[0].image)
    soft_result = engines.inpainter.inpaint(picture, mask, replace(request, soft=SoftInpainting())).images[0]
    soft = pixels(soft_result.image)
    assert np.array_equal(soft[:4], pixels(picture)[:4]) and np.array_equal(soft[:, -4:], pixels(picture)[:, -4:])
    assert np.abs(soft - hard).max() > 8
    assert parse_parameters(soft_result.parameters).extra["Soft inpainting enabled"] == "True"
    grown = engines.inpainter.inpaint(picture, None, replace(request, outpaint=Outpaint(right=32, top=16)))
    assert grown.images[0].image.size == (96, 80)

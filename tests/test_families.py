"""Model families: the one place that knows a family's components, pipelines, latents, working memory and
checkpoints. The rest of the engine asks them; these tests pin what they answer."""

import random

import pytest
import torch
from diffusers import AutoencoderKL
from tiny_models import EMBEDDED

from studio.core.devices import CUDA_INFERENCE_FLOOR, CUDA_RESERVE, working_memory_on
from studio.models.families import FAMILIES, checkpoint_family, family_named, family_of
from studio.models.presets import load_presets


def denoise_and_decode(family, width, height, dtype, guidance=True):
    return max(family.stage_working_memory("denoise", width, height, dtype, guidance),
               family.stage_working_memory("decode", width, height, dtype, guidance))


def test_working_memory_grows_with_area_guidance_and_dtype():
    sd = family_named("sd15")
    small = denoise_and_decode(sd, 512, 512, torch.float16)
    assert denoise_and_decode(sd, 1024, 1024, torch.float16) == pytest.approx(4 * small, rel=0.01)
    unguided = sd.stage_working_memory("denoise", 512, 512, torch.float16, guidance=False)
    assert sd.stage_working_memory("denoise", 512, 512, torch.float16, guidance=True) == pytest.approx(2 * unguided, rel=0.01)
    assert denoise_and_decode(sd, 512, 512, torch.float32) == pytest.approx(2 * small, rel=0.01)
    assert 0.5e9 < small < 2e9  # SD 1.5 at 512 px in fp16 needs about a gigabyte for the VAE decode


def test_denoising_memory_follows_comfyui_factors():
    """ComfyUI's memory_required: area × dtype bytes × 0.01 MiB × memory_usage_factor (2.0 for SD 1.x/2.x, 0.8
    for SDXL), with CFG's two halves in one batch; 10% slack."""
    area = 2 * 64 * 64  # 512 px, guidance
    for name, factor in (("sd15", 2.0), ("sd21", 2.0), ("sdxl", 0.8)):
        expected = area * 2 * 0.01 * 1024**2 * factor * 1.1
        got = family_named(name).stage_working_memory("denoise", 512, 512, torch.float16, guidance=True)
        assert got == pytest.approx(expected, rel=1e-6), name
    # the embedded VAE downsamples by 4: 16 × 16 latents at 64 px
    embedded = family_named("embedded").stage_working_memory("denoise", 64, 64, torch.float32, guidance=False)
    assert embedded == pytest.approx(16 * 16 * 4 * 0.01 * 1024**2 * 2.0 * 1.1, rel=1e-6)


def test_a_cuda_device_reserves_comfyuis_floor_and_reserve():
    small = 10 * 1024**2
    assert working_memory_on(torch.device("cpu"), small) == small
    assert working_memory_on(torch.device("cuda"), small) == CUDA_INFERENCE_FLOOR + CUDA_RESERVE
    large = 4 * 1024**3
    assert working_memory_on(torch.device("cuda"), large) == large + CUDA_RESERVE


def test_every_preset_names_a_family_and_the_embedded_model_is_its_own():
    presets = load_presets()
    assert {family_of(preset).name for preset in presets} <= set(FAMILIES)
    embedded = family_of(presets.get("embedded"))
    assert embedded.name == "embedded" and embedded.latent.downscale == 4 and embedded.context_width == 64
    assert family_of(presets.get("sdxl-base-1.0")).text_encoders == ("text_encoder", "text_encoder_2")


def test_the_embedded_family_matches_its_model_files():
    """What the embedded family says of its model is what the trained files say."""
    import json

    family = family_named("embedded")
    vae = json.loads((EMBEDDED / "vae" / "config.json").read_text())
    unet = json.loads((EMBEDDED / "unet" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == family.latent.downscale
    assert vae["scaling_factor"] == pytest.approx(family.latent.scaling_factor)
    assert vae["latent_channels"] == unet["in_channels"] == family.latent.channels
    assert unet["cross_attention_dim"] == family.context_width


def test_the_embedded_preview_factors_are_a_fit_of_its_vae():
    """The latent-to-RGB factors in the family are those studio.embedded.stages fits on the trained VAE; on other
    scenes, a preview from them is far closer to the image than one grey of the scenes' mean colour."""
    from studio.embedded import scenes
    from studio.embedded.stages import fit_latent_rgb_factors, render_batch

    family = family_named("embedded")
    vae = AutoencoderKL.from_pretrained(EMBEDDED / "vae").eval()
    factors, bias = fit_latent_rgb_factors(vae)
    assert torch.allclose(torch.tensor(factors), torch.tensor(family.latent.rgb_factors), atol=2e-3)
    assert bias == pytest.approx(list(family.latent.rgb_bias), abs=2e-3)
    rng = random.Random(99)  # not the fitted scenes
    images = render_batch([scenes.random_scene(rng) for _ in range(16)])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    preview = family.latent.preview(latents)
    target = (torch.nn.functional.avg_pool2d(images, family.latent.downscale) + 1) / 2
    assert preview.shape == target.shape
    flat = target.mean(dim=(0, 2, 3), keepdim=True)
    assert (preview - target).abs().mean() < 0.5 * (flat - target).abs().mean()


def test_single_file_checkpoints_are_told_apart_by_their_tensor_names():
    assert checkpoint_family({"conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.0.transformer.x"}).name == "sdxl"
    assert checkpoint_family({"cond_stage_model.model.ln_final.weight"}).name == "sd21"
    assert checkpoint_family({"cond_stage_model.transformer.text_model.x"}).name == "sd15"
    assert checkpoint_family({"model.diffusion_model.out.0.weight"}) is None


def test_pipelines_per_task_come_from_the_family():
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLImg2ImgPipeline

    assert family_named("embedded").pipeline_class("inpaint") is StableDiffusionInpaintPipeline
    assert family_named("sdxl").pipeline_class("img2img") is StableDiffusionXLImg2ImgPipeline
    with pytest.raises(ValueError, match="no pipeline"):
        family_named("sd15").pipeline_class("outpaint")


def test_sdxl_own_vae_decodes_in_fp32_under_fp16_only():
    sdxl = family_named("sdxl")
    assert sdxl.decode_dtype(torch.float16, own_vae=True) == torch.float32
    assert sdxl.decode_dtype(torch.float16, own_vae=False) == torch.float16  # the fp16-fix VAE
    assert sdxl.decode_dtype(torch.float32, own_vae=True) == torch.float32
    assert family_named("sd15").decode_dtype(torch.float16, own_vae=True) == torch.float16


@pytest.mark.parametrize("normalised", [False, True])
def test_the_family_decodes_latents_as_the_sdxl_pipeline_does(tmp_path, normalised):
    """The decode stage's latents -> image is the pipeline's own, with and without a VAE config that gives the
    latents' mean and std (SDXL's VAE may; the pipeline then un-normalises before decoding)."""
    from diffusers import StableDiffusionXLPipeline
    from tiny_models import save_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl(tmp_path / "sdxl"), add_watermarker=False)
    if normalised:
        pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    def run(output_type):
        return pipe(prompt_embeds=torch.zeros(1, 77, 80), pooled_prompt_embeds=torch.zeros(1, 32), width=64,
                    height=64, num_inference_steps=2, guidance_scale=1.0, output_type=output_type,
                    generator=torch.Generator().manual_seed(0)).images

    with torch.inference_mode():
        latents, expected = run("latent"), run("pt")
        image, dtype = family_named("sdxl").decode_latents(pipe.vae, latents, torch.device("cpu"))
    torch.testing.assert_close((image / 2 + 0.5).clamp(0, 1), expected)
    assert dtype == torch.float32


def test_an_unknown_family_is_refused_by_name():
    with pytest.raises(ValueError, match="Unknown model family 'sd4'.*sd15"):
        family_named("sd4")


def test_a_family_that_names_its_samplers_refuses_others(engine, monkeypatch):
    """A flow-matching family takes only its own samplers; the request check says which."""
    from studio.models.families.embedded import Embedded
    from studio.tasks.generation import TextToImageRequest

    monkeypatch.setattr(Embedded, "samplers", ("Euler",))
    ok = TextToImageRequest(prompt="a red circle", preset="embedded", scheduler="Euler")
    assert "scheduler" not in engine.problems(ok)
    refused = engine.problems(TextToImageRequest(prompt="a red circle", preset="embedded", scheduler="DDIM"))
    assert refused["scheduler"] == ("Scheduler 'DDIM' does not work with Embedded shapes model (offline). Choose one "
                                    "of: Euler.")

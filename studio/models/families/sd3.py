"""Stable Diffusion 3 and 3.5: an MMDiT transformer over 16-channel latents, three text encoders (CLIP-L and
OpenCLIP bigG, whose penultimate states lie side by side as SDXL's do, then T5-XXL's after them in one sequence;
the two CLIPs' pooled embeddings condition too), a VAE with a scaling factor and a shift."""

from __future__ import annotations

from types import MappingProxyType

import torch

from studio.a1111.prompts import compel_for, encode_windows, first_window_pooled, pad_to_length, parse_attention
from studio.a1111.prompts import split_at_breaks
from studio.models.families.base import LatentFormat, WorkingMemory
from studio.models.families.flow_matching import FLOW_VAE_DECODE_BYTES, T5_ENCODE_MIB, FlowMatchingFamily

COMFYUI_SD3 = "ComfyUI comfy/supported_models.py (SD3.memory_usage_factor 1.6) and comfy/sd.py (its VAE's decode)"


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    label = "Stable Diffusion 3.5"
    short_label = "SD 3.x"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    pipeline_classes = MappingProxyType({"text2img": "StableDiffusion3Pipeline",
                                         "img2img": "StableDiffusion3Img2ImgPipeline",
                                         "inpaint": "StableDiffusion3InpaintPipeline"})
    preview_decoder = "madebyollin/taesd3"
    # ComfyUI's latent_formats.SD3 (the factors with a bias, fitted on SD 3's VAE; they read the model's latents)
    latent = LatentFormat(
        channels=16, downscale=8, scaling_factor=1.5305, shift_factor=0.0609,
        rgb_factors=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
                     (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
                     (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
                     (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
                     (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
                     (-0.1448, -0.1463, -0.1189)),
        rgb_bias=(0.2394, 0.2135, 0.1925))
    working_memory = WorkingMemory(denoise_factor=1.6, decode_bytes_per_pixel=FLOW_VAE_DECODE_BYTES,
                                   encode_mib_per_prompt=T5_ENCODE_MIB, source=COMFYUI_SD3)
    context_width = 4096  # T5-XXL's width, which the joint attention reads
    component_classes = MappingProxyType({"vae": ("diffusers", "AutoencoderKL"),
                                          "transformer": ("diffusers", "SD3Transformer2DModel"),
                                          "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
                                          "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                                          "text_encoder_3": ("transformers", "T5EncoderModel")})
    lora_loader = "SD3LoraLoaderMixin"
    prompt_reading = ("Prompt: CLIP-L and CLIP-G read it 75 tokens at a time, T5-XXL its first {t5_window} tokens (a "
                      "longer prompt is cut, with a note); (word:1.2) weights apply to all three")
    t5, t5_tokenizer, t5_window = "text_encoder_3", "tokenizer_3", 256

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance, clip_skip, device, t5_window: int = 0):
        """Both CLIPs' penultimate hidden states side by side (window by window, as A1111 chains windows), padded
        to T5's width, then T5's window after them; the CLIPs' pooled embeddings of the first window side by
        side. The negative prompt is encoded the same way, even when empty (as diffusers does for SD 3)."""
        from compel import ReturnedEmbeddingsType

        penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        clips = (compel_for(pipe.tokenizer, pipe.text_encoder, device, penultimate, requires_pooled=True),
                 compel_for(pipe.tokenizer_2, pipe.text_encoder_2, device, penultimate, requires_pooled=True))

        def encoded(text: str):
            groups = split_at_breaks(parse_attention(text))
            pooled = torch.cat([first_window_pooled(compel, groups, device) for compel in clips], dim=-1)
            t5 = self.encode_t5(pipe, text, device, t5_window or self.t5_window)
            return [encode_windows(compel, groups) for compel in clips], pooled, t5

        def joined(clip_parts: list[torch.Tensor], t5: torch.Tensor, length: int) -> torch.Tensor:
            clip = torch.cat([pad_to_length(compel, part, length) for compel, part in zip(clips, clip_parts)], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5.to(clip.dtype)], dim=-2)

        parts, pooled, t5 = encoded(prompt)
        if not guidance:
            return {"prompt_embeds": joined(parts, t5, parts[0].shape[1]), "pooled_prompt_embeds": pooled}
        negative_parts, negative_pooled, negative_t5 = encoded(negative_prompt)
        length = max(part.shape[1] for part in parts + negative_parts)
        return {"prompt_embeds": joined(parts, t5, length),
                "negative_prompt_embeds": joined(negative_parts, negative_t5, length),
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}

    def recognises(self, tensor_names) -> bool:
        return any(".joint_blocks." in name or name.startswith("joint_blocks.") for name in tensor_names)

"""What SD 3 and FLUX share: flow matching (the transformer predicts a velocity from noise to image, sampled on
sigmas from 1 to 0 by FLOW_SCHEDULERS), a 16-channel VAE whose latents are scaled and shifted, CLIP and T5-XXL text
encoders read in A1111's syntax (studio.a1111.t5_prompts for T5), and an MMDiT transformer as the denoiser."""

from __future__ import annotations

import torch

from studio.a1111.prompts import parse_attention
from studio.a1111.schedulers import FLOW_SCHEDULERS
from studio.a1111.t5_prompts import T5Tokens, cut_note, t5_tokens
from studio.models.families.base import ModelFamily

# ComfyUI's memory_used_decode for the 16-channel VAEs of SD 3 and FLUX (comfy/sd.py): 2562 bytes per output pixel
# per byte of dtype, where SD's 4-channel VAE takes 2178.
FLOW_VAE_DECODE_BYTES = 2562
# A T5-XXL window of 512 tokens: 64 heads × 512² attention scores and a few 512 × 10240 activations, per prompt
# per byte of dtype, with room.
T5_ENCODE_MIB = 96


class FlowMatchingFamily(ModelFamily):
    """A family whose denoiser is a flow-matching transformer (SD 3, FLUX)."""

    flow_matching = True
    denoiser = "transformer"
    denoiser_label = "transformer"
    samplers = tuple(FLOW_SCHEDULERS)
    t5 = "text_encoder_3"  # the T5 encoder's component, and its tokenizer's
    t5_tokenizer = "tokenizer_3"
    t5_window = 256  # tokens T5 reads (diffusers' max_sequence_length)
    # on a small GPU: the transformer and T5-XXL (9.5 GB in 16 bits) stored in float8, computed in bfloat16; the
    # transformer's blocks (FLUX: 57; SD 3.5 Large: 38) streamed as the last resort
    streamed_blocks = ("transformer",)

    @property
    def float8_storage(self) -> tuple[str, ...]:
        return (self.denoiser, self.t5)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """bfloat16 where the studio runs in float16: SD 3.5 and FLUX were trained in bfloat16, and T5-XXL's
        activations overflow float16 (inf, then NaN: a black image), as diffusers' and Forge's docs warn."""
        return torch.bfloat16 if dtype == torch.float16 else dtype

    def decode_dtype(self, dtype: torch.dtype, own_vae: bool) -> torch.dtype:
        return self.compute_dtype(dtype)

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """As their pipelines decode: unscaled, then unshifted (the VAE's latents have a mean the model's don't)."""
        return latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)

    def size_arguments(self, task: str, width: int, height: int) -> dict[str, int]:
        """Their image-to-image pipelines start from their default size (1024 px), not the image's: told always."""
        return {"width": width, "height": height}

    def text_encoder_layers(self, pipe) -> int:
        return getattr(pipe, self.text_encoders[0]).config.num_hidden_layers

    def needs_known_region_blending(self, pipe) -> bool:
        """diffusers' SD 3 and FLUX inpaint pipelines put the original back outside the mask at each step
        themselves, and FLUX Fill is conditioned on the masked image (as diffusers and ComfyUI run it)."""
        return False

    # ----- T5 -----

    def prompt_reading_of(self, preset) -> str:
        return self.prompt_reading.format(t5_window=preset.t5_window or self.t5_window)

    def prompt_options(self, preset) -> dict:
        """T5's window: the family's, or the preset's own (FLUX.1 [schnell] was distilled on 256 tokens)."""
        return {"t5_window": preset.t5_window or self.t5_window}

    def t5_window_tokens(self, pipe, text: str, window: int) -> T5Tokens:
        return t5_tokens(getattr(pipe, self.t5_tokenizer), parse_attention(text), window)

    def encode_t5(self, pipe, text: str, device: torch.device, window: int) -> torch.Tensor:
        return self.t5_window_tokens(pipe, text, window).encode(getattr(pipe, self.t5), device)

    def prompt_notes(self, pipe, prompt: str, negative_prompt: str, guidance: bool, t5_window: int = 0) -> list[str]:
        """A prompt T5 could not read whole is said, never cut silently."""
        window = t5_window or self.t5_window
        notes = []
        for text, negative in ((prompt, False), (negative_prompt, True)):
            if negative and not guidance:
                continue
            cut = self.t5_window_tokens(pipe, text, window).cut
            if cut:
                notes.append(cut_note("T5", window, cut, negative))
        return notes

"""The embedded families: small models this project trains on drawn shapes (studio/embedded/), 64 px, over one VAE
that downsamples by 4 to 4 channels. `Embedded` is SD-shaped (a UNet and a 64-wide CLIP; SD 1.x's pipelines);
`EmbeddedFlux` is FLUX-shaped (a rectified-flow transformer reading a small T5 and that CLIP's pooled embedding;
FLUX's pipelines), so the flow code paths run on a model that draws what it is asked."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from studio.a1111.prompts import parse_attention
from studio.a1111.t5_prompts import T5Tokens, t5_tokens
from studio.models.families.base import LatentFormat, WorkingMemory
from studio.models.families.flux import COMFYUI_FLUX, Flux
from studio.models.families.stable_diffusion import COMFYUI_FACTORS, StableDiffusion1

# The embedded VAE's latents. Preview factors fitted on the trained VAE by
# studio.embedded.stages.fit_latent_rgb_factors (256 random scenes, seed 0); tests/test_families.py fits them again
# and compares. (The fit explains 82% of the colour variance: RMSE 0.29 on colours of standard deviation 0.69.)
EMBEDDED_LATENT = LatentFormat(channels=4, downscale=4, scaling_factor=0.67943,
                               rgb_factors=((0.3582, 0.3537, 0.6958), (0.5195, 0.5876, 0.6149),
                                            (0.5300, 0.7385, 0.2281), (-0.8884, -0.4033, -0.2280)),
                               rgb_bias=(-0.0890, 0.0547, -0.0810))


class Embedded(StableDiffusion1):
    name = "embedded"
    label = "Embedded shapes"
    short_label = "the embedded model"
    preview_decoder = None  # its own, trained here, is named by its preset (models/embedded-taesd)
    latent = EMBEDDED_LATENT
    working_memory = WorkingMemory(denoise_factor=2.0, source=COMFYUI_FACTORS + " (SD 1.x's, whose UNet it shares)")
    context_width = 64
    prompt_reading = "Prompt: its own small CLIP reads it 30 tokens at a time"
    checkpoint_config = None  # no single-file checkpoints: it is saved as a diffusers folder
    checkpoint_prefixes = MappingProxyType({})
    takes_safety_checker = True  # the SD 1.x pipelines; it is safe by construction and runs without one

    def recognises(self, tensor_names) -> bool:
        return False


class EmbeddedFlux(Flux):
    """FLUX.1's code paths over the embedded VAE: 4 channels packed 2×2 into 16-channel tokens, no latent shift
    (the VAE's config says 0), a static schedule shift of 3 in its scheduler's config, true CFG, no guidance
    embedding, no Fill model (it inpaints with FluxInpaintPipeline)."""

    name = "embedded-flux"
    label = "Embedded shapes, FLUX-shaped"
    short_label = "the embedded flow model"
    preview_decoder = None  # the embedded TAESD, named by its preset: the same VAE's latents
    latent = replace(EMBEDDED_LATENT, packed=True)
    working_memory = WorkingMemory(denoise_factor=3.1, encode_mib_per_prompt=1, source=COMFYUI_FLUX + " (FLUX's)")
    context_width = 64  # its T5's width
    t5_window = 32  # its longest caption is 14 words, a token each
    prompt_reading = ("Prompt: its own small T5 reads its first {t5_window} tokens, its CLIP the first 30 for the "
                      "overall embedding; (word:1.2) weights apply to both")
    float8_storage = ()  # a few megabytes: never stored in float8 or streamed
    streamed_blocks = ()

    def t5_window_tokens(self, pipe, text: str, window: int) -> T5Tokens:
        """Its T5's vocabulary is the captions' words, in lower case (its CLIP's tokenizer lower-cases too): "A Red
        Circle" is read as "a red circle", not as unknown capitals."""
        fragments = [(fragment.lower(), weight) for fragment, weight in parse_attention(text)]
        return t5_tokens(getattr(pipe, self.t5_tokenizer), fragments, window)

    def recognises(self, tensor_names) -> bool:
        return False

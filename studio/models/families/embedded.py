"""The embedded family: the small SD-shaped model this project trains on drawn shapes (studio/embedded/), 64 px, a
VAE that downsamples by 4, a 64-wide CLIP text encoder. It runs through Stable Diffusion 1.x's pipelines."""

from __future__ import annotations

from types import MappingProxyType

from studio.models.families.base import LatentFormat, WorkingMemory
from studio.models.families.stable_diffusion import COMFYUI_FACTORS, StableDiffusion1


class Embedded(StableDiffusion1):
    name = "embedded"
    label = "Embedded shapes"
    short_label = "the embedded model"
    # Preview factors fitted on the trained VAE by studio.embedded.stages.fit_latent_rgb_factors (256 random
    # scenes, seed 0); tests/test_families.py fits them again and compares.
    # (the fit explains 82% of the colour variance: RMSE 0.29 on colours of standard deviation 0.69)
    preview_decoder = None  # its own, trained here, is named by its preset (models/embedded-taesd)
    latent = LatentFormat(channels=4, downscale=4, scaling_factor=0.67943,
                          rgb_factors=((0.3582, 0.3537, 0.6958), (0.5195, 0.5876, 0.6149), (0.5300, 0.7385, 0.2281),
                                       (-0.8884, -0.4033, -0.2280)),
                          rgb_bias=(-0.0890, 0.0547, -0.0810))
    working_memory = WorkingMemory(denoise_factor=2.0, source=COMFYUI_FACTORS + " (SD 1.x's, whose UNet it shares)")
    context_width = 64
    prompt_reading = "Prompt: its own small CLIP reads it 30 tokens at a time"
    checkpoint_config = None  # no single-file checkpoints: it is saved as a diffusers folder
    checkpoint_prefixes = MappingProxyType({})
    takes_safety_checker = True  # the SD 1.x pipelines; it is safe by construction and runs without one

    def recognises(self, tensor_names) -> bool:
        return False

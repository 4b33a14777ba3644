"""TAESD, the tiny decoders live previews can use (madebyollin's taesd, taesdxl; the embedded family's own, trained
here): diffusers' `AutoencoderTiny`, a model kind of its own in the one ModelManager. Its files are fetched like any
model's, before the device work; it is leased beside the denoiser while a watched pass runs, and decodes the
sampler's estimate of the clean latents (a few milliseconds; a full VAE decode would cost a step)."""

from __future__ import annotations

import os

import torch

from studio.core.downloads import DownloadRequest, is_local_folder
from studio.core.model_records import ModelKey
from studio.models.families import family_of
from studio.models.loading import cached_folder, unavailable
from studio.models.weights import safetensors_bytes, weight_files

PREVIEW_DECODER = "preview_decoder"
NO_PREVIEW_DECODER = "none"  # a preset's `preview_decoder: none` turns its family's TAESD off (Fast previews)
FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# a decode's activations: its output pixels × its widest block's channels × the dtype's bytes, three such tensors
# alive at once (a block's input, its convolution's output and the skip), with 10% slack
ACTIVATIONS_ALIVE = 3 * 1.1


def preview_decoder_of(preset) -> str | None:
    """The preset's TAESD (a Hub repo or a folder): its own `preview_decoder:`, else its family's; None for none."""
    if preset.preview_decoder == NO_PREVIEW_DECODER:
        return None
    return preset.preview_decoder or family_of(preset).preview_decoder


def preview_decoder_key(source: str) -> ModelKey:
    return ModelKey(PREVIEW_DECODER, source)


def decoder_download(source: str) -> DownloadRequest | None:
    """What to fetch from the Hub for it (None for a folder)."""
    if is_local_folder(source):
        return None
    return DownloadRequest(source, FILES, label=f"TAESD ({source})")


def decode_working_memory(width: int, height: int, dtype: torch.dtype, widest: int = 64) -> int:
    return int(width * height * widest * (torch.finfo(dtype).bits // 8) * ACTIVATIONS_ALIVE)


def preview_image(decoder, latents: torch.Tensor) -> torch.Tensor:
    """The first image of `latents` (the pipeline's, already scaled) as (3, H, W) RGB in [0, 1] on the CPU."""
    with torch.inference_mode():
        pixels = decoder.decode(latents[:1].to(decoder.device, decoder.dtype)).sample[0]
    return ((pixels.float().cpu() + 1) / 2).clamp(0, 1)


class PreviewDecoderLoader:
    """The ModelManager's loader for kind "preview_decoder": AutoencoderTiny.from_pretrained from a folder or the
    Hub cache (fetched beforehand, outside the device lock)."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return safetensors_bytes(weight_files(cached_folder(key.source, list(FILES)), None), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderTiny

        try:
            return AutoencoderTiny.from_pretrained(key.source, dtype=dtype, use_safetensors=True,
                                                   local_files_only=not os.path.isdir(key.source)).eval()
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise unavailable(key.source, error) from error

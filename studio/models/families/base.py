"""What a model family is: everything the engine must know about one kind of model, in one object.

The engine around it (loading, the memory manager, stages, tasks, LoRA, the UI) asks the family and never names a
component of its own: a family says which components it has and in which stage each runs, the dtype its VAE
decodes in, the diffusers pipeline for each task, how a prompt becomes embeddings, what its latents
look like, how much working memory each stage needs, which LoRA files fit it and how they load, which samplers it
takes, and how to recognise its single-file checkpoints. docs/model-families.md says what a new family adds.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

TASKS = ("text2img", "img2img", "inpaint")
STAGES = ("encode", "denoise", "decode")
MiB = 1024 * 1024


@dataclass(frozen=True)
class LatentFormat:
    """The latent space the denoiser works in, as the pipelines hand latents between stages (already multiplied by
    the VAE's scaling factor).

    `rgb_factors` (one row per channel) and `rgb_bias` map a latent pixel to an approximate RGB colour in [-1, 1]:
    a live preview without the VAE, as ComfyUI (comfy/latent_formats.py) and InvokeAI draw theirs."""

    channels: int
    downscale: int  # image pixels per latent pixel, each side (the VAE's; a family may pack further)
    scaling_factor: float
    shift_factor: float = 0.0
    rgb_factors: tuple[tuple[float, float, float], ...] = ()
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    packed: bool = False  # 2×2 latent patches packed into tokens (FLUX)

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, channels, h, w) latents -> (batch, 3, h, w) RGB in [0, 1], from the factors."""
        if not self.rgb_factors:
            raise ValueError("This latent format has no latent-to-RGB factors.")
        factors = torch.tensor(self.rgb_factors, dtype=torch.float32)
        bias = torch.tensor(self.rgb_bias, dtype=torch.float32)
        rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), factors) + bias.view(1, 3, 1, 1)
        return ((rgb + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class WorkingMemory:
    """Bytes of activations a stage needs beyond its weights, per image, and where each figure comes from; every
    figure has 10% slack, as ComfyUI frees 1.1× what it estimates.

    Denoising follows ComfyUI's `BaseModel.memory_required` with efficient attention: latent area × the dtype's
    bytes × 0.01 MiB × the family's `memory_usage_factor` (comfy/supported_models.py), the area doubled under
    classifier-free guidance, whose two halves run as one batch. Decoding: 2178 bytes per output pixel per byte of
    dtype, ComfyUI's `memory_used_decode` for the SD VAEs. Encoding: 32 MiB per prompt per byte of dtype covers a
    window of SDXL's OpenCLIP bigG encoder."""

    denoise_factor: float
    decode_bytes_per_pixel: float = 2178
    encode_mib_per_prompt: float = 32
    source: str = ""
    slack: float = 1.1

    def denoise(self, latent_area: int, dtype: torch.dtype) -> int:
        return int(latent_area * dtype_bytes(dtype) * 0.01 * MiB * self.denoise_factor * self.slack)

    def decode(self, pixels: int, dtype: torch.dtype) -> int:
        return int(pixels * self.decode_bytes_per_pixel * dtype_bytes(dtype) * self.slack)

    def encode(self, prompts: int, dtype: torch.dtype) -> int:
        return int(prompts * self.encode_mib_per_prompt * MiB * dtype_bytes(dtype))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


class ModelFamily:
    """One family of models. Subclasses set the class attributes and override what differs; one instance of each
    lives in `studio.models.families.FAMILIES` (immutable, shared by every request)."""

    name: str  # the presets' `family:`
    label: str
    short_label: str  # in sentences: "made for SD 1.x"
    denoiser: str  # the component that denoises ("unet"; "transformer" for SD 3 and FLUX)
    denoiser_label = "UNet"  # its name in messages
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    vae = "vae"
    scheduler = "scheduler"
    pipeline_classes: Mapping[str, str]  # task -> diffusers pipeline class name
    controlnet_pipeline_classes: Mapping[str, str] = MappingProxyType({})  # task -> ... with ControlNets
    latent: LatentFormat
    working_memory: WorkingMemory
    context_width: int  # the width of the text embeddings the denoiser reads: which LoRAs fit
    checkpoint_config: str | None = None  # the diffusers repo whose configs describe a single-file checkpoint
    checkpoint_prefixes: Mapping[str, tuple[str, ...]] = MappingProxyType({})  # component -> where its tensors sit
    component_classes: Mapping[str, tuple[str, str]] = MappingProxyType({})  # component -> (library, class), alone
    lora_loader = "StableDiffusionLoraLoaderMixin"  # the diffusers mixin whose lora_state_dict converts its files
    clip_skip = False  # whether A1111's clip skip applies (its text encoder is CLIP ViT-L)
    samplers: tuple[str, ...] | None = None  # the sampler names it takes; None: every noise-prediction sampler
    takes_safety_checker = False  # its pipelines run the SD safety checker (those of SDXL have none)
    # the Hub repo of its TAESD (diffusers' AutoencoderTiny, madebyollin's): a tiny decoder for live previews
    preview_decoder: str | None = None
    prompt_reading = ""  # which text encoder reads what of the prompt, for the preset's card
    float8_storage: tuple[str, ...] = ()  # components stored in float8 when the device is too small for them
    streamed_blocks: tuple[str, ...] = ()  # components whose blocks stream from RAM as the last resort
    flow_matching = False  # a flow-matching model (SD 3, FLUX): its samplers are FLOW_SCHEDULERS, with a shift
    distilled_guidance = False  # a guidance-distilled model may take a "Distilled CFG Scale" (FLUX.1-dev)

    # ----- components -----

    @property
    def components(self) -> tuple[str, ...]:
        """Every component a pipeline of the family is made of, in the order they run."""
        return (*self.text_encoders, *self.tokenizers, self.vae, self.denoiser, self.scheduler)

    def stage_components(self, stage: str, task: str) -> tuple[str, ...]:
        """The components a stage holds on the device."""
        if stage == "encode":
            return (*self.text_encoders, *self.tokenizers)
        if stage == "denoise":  # the VAE encodes the init image of img2img and inpaint first
            return (self.denoiser, self.scheduler) + ((self.vae,) if task != "text2img" else ())
        if stage == "decode":
            return (self.vae,)
        raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the family's models load and run in when the studio runs in `dtype`."""
        return dtype

    def decode_dtype(self, dtype: torch.dtype, own_vae: bool) -> torch.dtype:
        """The dtype the VAE decodes in when the studio runs in `dtype`: the same, unless the family's own VAE
        overflows in it (SDXL's in fp16). `own_vae`: the preset did not swap the VAE for another."""
        return dtype

    # ----- pipelines -----

    def pipeline_class(self, task: str, controlnet: bool = False) -> type:
        """The diffusers pipeline for `task`; `controlnet`: the one that also runs ControlNets."""
        classes = self.controlnet_pipeline_classes if controlnet else self.pipeline_classes
        if task not in classes:
            raise ValueError(f"{self.label} has no {'ControlNet ' if controlnet else ''}pipeline for {task!r}.")
        return self._diffusers_class(classes[task])

    def pipeline_class_for(self, task: str, parts: Mapping[str, Any], controlnet: bool = False) -> type:
        """The pipeline for `task` over a stage's components (`parts`: a family may pick by its denoiser)."""
        return self.pipeline_class(task, controlnet)

    @staticmethod
    def _diffusers_class(name: str) -> type:
        return getattr(importlib.import_module("diffusers"), name)

    def guidance_evaluations(self, guidance_scale: float) -> int:
        """Denoiser evaluations a step costs for guidance, beyond the sampler's: SD's CFG halves run as one batch,
        which a preset's seconds_per_step already counts."""
        return 1

    def call_arguments(self, pipe, embeds: Mapping[str, torch.Tensor], guidance_scale: float,
                       distilled_guidance: float | None) -> dict[str, Any]:
        """The pipeline call's prompt embeddings and guidance (`distilled_guidance`: FLUX.1-dev's; None: none)."""
        return {**embeds, "guidance_scale": guidance_scale}

    def size_arguments(self, task: str, width: int, height: int) -> dict[str, int]:
        """The size a pipeline call of `task` is told (SD's image-to-image takes its size from the image)."""
        return {}

    def control_image_argument(self, task: str) -> str:
        """The ControlNet pipeline's argument for the control maps (text to image's `image`; where `image` is the
        init image, `control_image`)."""
        return "image" if task == "text2img" else "control_image"

    def pipeline_arguments(self, parts: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline constructor's keyword arguments over a stage's components (None where a stage lacks one)."""
        arguments = {role: parts.get(role) for role in self.components}
        if self.takes_safety_checker:
            arguments.update(safety_checker=parts.get("safety_checker"),
                             feature_extractor=parts.get("feature_extractor"), requires_safety_checker=False)
        return arguments

    def denoiser_of(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser)

    def takes_inpaint_channels(self, pipe) -> bool:
        """Whether the pipeline's denoiser is a dedicated inpainting model (latents, mask and masked image in)."""
        return self.denoiser_of(pipe).config.in_channels != self.latent.channels

    def needs_known_region_blending(self, pipe) -> bool:
        """Whether the studio puts the original back outside the mask after each step (studio.tasks.step_hooks):
        for a dedicated inpainting UNet, which diffusers leaves to itself."""
        return self.takes_inpaint_channels(pipe)

    # ----- latents -----

    def decode_latents(self, vae, latents: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.dtype]:
        """Denoised latents -> (image in [-1, 1], the dtype the VAE decoded in), as the family's pipelines decode:
        the latents unscaled by the VAE's config and cast to the dtype of its first layer. `device`: the manager's,
        not the VAE's: under model CPU offload the VAE waits in RAM until its forward hook moves it."""
        first_layer = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        dtype = next(iter(first_layer.parameters())).dtype
        latents = self.unscale_latents(vae, latents.to(device, dtype))
        return vae.decode(latents, return_dict=False)[0], dtype

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return latents / vae.config.scaling_factor

    def spatial_latents(self, pipe, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The latents a pipeline returns (output_type="latent") as (batch, channels, h, w): FLUX unpacks them."""
        return latents

    def preview_latents(self, latents: torch.Tensor, width: int, height: int, vae_scale_factor: int) -> torch.Tensor:
        """A step's latents as (batch, channels, h, w), for a preview."""
        return latents

    def packed_latents(self, pipe, spatial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(batch, channels, h, w) latents back in the layout of the pipeline's own `like` (preview_latents'
        inverse), for a step hook that works on them spatially."""
        return spatial

    # ----- prompts -----

    def encode_prompt(self, pipe, prompt: str, negative_prompt: str, guidance: bool, clip_skip: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        """Keyword arguments for the pipeline call (prompt_embeds, negative_prompt_embeds, ...) from prompts in
        A1111's syntax."""
        raise NotImplementedError

    def prompt_notes(self, pipe, prompt: str, negative_prompt: str, guidance: bool) -> list[str]:
        """What the user is told about how the encoders read the prompts (a prompt cut at T5's window)."""
        return []

    def prompt_reading_of(self, preset) -> str:
        """Which text encoder reads what of the prompt, for the preset's card."""
        return self.prompt_reading

    def prompt_options(self, preset) -> dict[str, Any]:
        """What encode_prompt and prompt_notes take from the preset beyond the prompts (T5's window)."""
        return {}

    def task_problems(self, preset, task: str, guidance_scale: float) -> dict[str, str]:
        """Settings the family's model for `task` cannot take, by field (FLUX.1 Fill: no CFG)."""
        return {}

    def text_encoder_layers(self, pipe) -> int:
        """How many layers the first text encoder has (the most clip skip can skip)."""
        return getattr(pipe, self.text_encoders[0]).config.num_hidden_layers

    # ----- working memory -----

    def stage_working_memory(self, stage: str, width: int, height: int, dtype: torch.dtype, guidance: bool) -> int:
        """Working memory of one image at width × height in a stage, in `dtype` (the VAE's for decode)."""
        if stage == "encode":
            return self.working_memory.encode(2 if guidance else 1, dtype)
        if stage == "denoise":
            factor = self.latent.downscale
            area = (width // factor) * (height // factor) * (2 if guidance else 1)
            return self.working_memory.denoise(area, dtype)
        if stage == "decode":
            return self.working_memory.decode(width * height, dtype)
        raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")

    # ----- single-file checkpoints -----

    def recognises(self, tensor_names: set[str] | Mapping[str, Any]) -> bool:
        """Whether an original-layout checkpoint (its tensor names) is of this family."""
        return False

    def checkpoint_tensors(self, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors as diffusers' single-file conversion reads them (old files renamed)."""
        return checkpoint

    def checkpoint_overrides(self, component: str, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Config values a checkpoint's file says and the base configs do not (an inpainting UNet's 9 inputs)."""
        return {}

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{self!r} is shared by every request: it cannot be changed.")

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.label}>"

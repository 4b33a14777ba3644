"""One image as stages, each holding only what it uses on the device: encode (text encoders), denoise (the
denoiser, and the VAE for an init image), decode (VAE), check (safety checker). Models are leased per stage from the
shared ModelManager; between stages the device lock is free, so other jobs take turns. A stage that runs out of
memory is retried with VAE tiling, then with idle models off the device, then (SD 3, FLUX) with their transformer and
T5 stored in float8, then (on CUDA) with accelerate's model CPU offload, then (SD 3, FLUX) with the transformer's
blocks streamed from RAM, and only then reported. What differs between model families is asked of the preset's family."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

from studio.core.devices import dtype_name, format_bytes, release_memory, working_memory_on
from studio.core.errors import InvalidRequest, NumericalError, OutOfMemoryBudget
from studio.core.memory import ModelManager
from studio.core.model_records import ModelKey, Patch
from studio.models.components import DiffusersModels
from studio.models.controlnets import CONTROLNET, ControlUnits, PassControls, adapter_residuals
from studio.models.families import family_of
from studio.models.families.base import dtype_bytes
from studio.models.loras import LORA, AppliedLora, lora_patch, lora_role
from studio.models.preview_decoders import PREVIEW_DECODER, decode_working_memory

VAE_TILE = 512  # pixels: the tile a tiled VAE decodes at a time (SD's native size)
FLOAT8 = torch.float8_e4m3fn  # the storage a model too large for the device is kept in (ComfyUI's and Forge's fp8)
# A ControlNet runs before the denoiser at each evaluation, and its activations are gone when the denoiser's begin;
# what stays is the residuals it hands over: SD 1.5 at 512² under CFG, 6.7 M values (27 MB in fp16), 8% of the
# denoise stage's estimate. Each unit adds this share of that estimate.
CONTROLNET_WORKING_SHARE = 0.1
log = logging.getLogger("studio.models.stages")


@dataclass
class Conditioning:
    """The prompt's embeddings, made once per job by the encode stage and reused for every image."""

    embeds: dict[str, torch.Tensor]  # keyword arguments for the pipeline call: prompt_embeds, negative_prompt_embeds ...


@dataclass(frozen=True)
class StagePlan:
    """What a stage holds on the device: its models and the working memory reserved for its activations."""

    stage: str
    keys: dict[str, ModelKey]
    working_memory: int
    vae_tiling: bool = False
    patches: dict[str, Patch] = field(default_factory=dict)  # role -> the change its model carries (LoRAs)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # role -> the dtype it runs in, cast for the stage
    storage: dict[str, torch.dtype] = field(default_factory=dict)  # role -> stored in (float8), from now on


class DiffusionStages:
    """One image as stages on models leased per stage from the shared ModelManager."""

    def __init__(self, manager: ModelManager, models: DiffusersModels):
        self.manager = manager
        self.models = models

    # ----- plans: what each stage holds (the device planner in bench/ runs these same plans) -----

    def plan_encode(self, preset, task: str, guidance: bool, loras: tuple[AppliedLora, ...] = ()) -> StagePlan:
        loras = tuple(lora for lora in loras if lora.text_encoder_layers)  # only those with layers to apply here
        working = family_of(preset).stage_working_memory("encode", 0, 0, self.manager.dtype, guidance)
        keys = self.models.stage_keys(preset, task, "encode")
        return self._with_loras(StagePlan("encode", keys, working), family_of(preset).text_encoders, loras, preset)

    def plan_denoise(self, preset, task: str, width: int, height: int, guidance: bool, tiled: bool = False,
                     loras: tuple[AppliedLora, ...] = (), controls: PassControls | None = None,
                     preview_decoder: ModelKey | None = None) -> StagePlan:
        """`controls`: the pass's control units, whose ControlNets are leased beside the denoiser;
        `preview_decoder`: a TAESD leased beside it for live previews (it decodes between steps, when the
        denoiser's activations are gone: the stage needs the larger of the two)."""
        loras = tuple(lora for lora in loras if lora.denoiser_layers)
        working = family_of(preset).stage_working_memory("denoise", width, height, self.manager.dtype, guidance)
        keys = self.models.stage_keys(preset, task, "denoise")
        if controls is not None:
            keys |= controls.roles()
            working += int(len(controls.keys) * CONTROLNET_WORKING_SHARE * working)
        if preview_decoder is not None:
            keys[PREVIEW_DECODER] = preview_decoder
            working = max(working, decode_working_memory(width, height, self.manager.dtype))
        if task != "text2img":  # the VAE encodes the init image first (its activations are gone before the UNet runs)
            working = max(working, self._vae_working_memory(preset, width, height, tiled))
            if self._decode_dtype(preset) != self.manager.dtype:  # diffusers upcasts it to encode, then casts back
                working += self._upcast_bytes(keys[family_of(preset).vae], self._decode_dtype(preset))
        plan = StagePlan("denoise", keys, working, vae_tiling=tiled)
        return self._with_loras(plan, (family_of(preset).denoiser,), loras, preset)

    def _with_loras(self, plan: StagePlan, components: tuple[str, ...], loras: tuple[AppliedLora, ...],
                    preset) -> StagePlan:
        """The plan with the LoRAs as patches on `components`, and its working memory made final (CUDA's floor).
        A model that already carries its patch (this job's previous image) needs neither the LoRA files nor room
        to merge them; one that does not gets them leased, and room for PEFT's copy of their weights."""
        patches, to_apply = {}, False
        for component in components if loras else ():
            patch = lora_patch(component, family_of(preset), loras)
            patches[component] = patch
            to_apply = to_apply or not self.manager.carries(plan.keys[component], patch.identity)
        keys, working = dict(plan.keys), plan.working_memory
        if to_apply:  # the LoRA files, and PEFT's copy of them in the adapter layers while they are merged
            keys |= {lora_role(lora): lora.key for lora in loras}
            working += len(components) * sum(self.manager.loaders[LORA].size(lora.key, self.manager.dtype)
                                             for lora in loras)
        return replace(plan, keys=keys, working_memory=self._reserved(working), patches=patches)

    def plan_decode(self, preset, task: str, width: int, height: int, tiled: bool = False,
                    in_float32: bool = False) -> StagePlan:
        """`in_float32`: the VAE decodes in float32 whatever the family says (decode's second try after NaN). A VAE
        that decodes in another dtype than it is kept in is cast by the manager for the stage (recorded so), and
        its weights take that much more room meanwhile."""
        keys = self.models.stage_keys(preset, task, "decode")
        vae = family_of(preset).vae
        dtype = torch.float32 if in_float32 else self._decode_dtype(preset)
        working = self._vae_working_memory(preset, width, height, tiled, dtype)
        dtypes = {}
        if dtype != self.manager.dtype:
            dtypes[vae] = dtype
            working += self._upcast_bytes(keys[vae], dtype)
        return StagePlan("decode", keys, self._reserved(working), vae_tiling=tiled, dtypes=dtypes)

    def plan_check(self, preset, task: str) -> StagePlan | None:
        keys = self.models.stage_keys(preset, task, "check")
        return StagePlan("check", keys, self._reserved(256 * 1024**2)) if keys else None

    def _upcast_bytes(self, key: ModelKey, dtype: torch.dtype) -> int:
        """What a model's weights grow by when cast from the manager's dtype to `dtype`."""
        size = self.manager.loaders[key.kind].size(key, self.manager.dtype)
        return max(size * dtype_bytes(dtype) // dtype_bytes(self.manager.dtype) - size, 0)

    def _reserved(self, estimate: int) -> int:
        """A stage's working memory on this device: the estimate, with CUDA's floor and reserve on a GPU."""
        return working_memory_on(self.manager.device, estimate)

    def _decode_dtype(self, preset) -> torch.dtype:
        family = family_of(preset)
        return family.decode_dtype(self.manager.dtype, own_vae=family.vae not in preset.components)

    def _vae_working_memory(self, preset, width: int, height: int, tiled: bool,
                            dtype: torch.dtype | None = None) -> int:
        if tiled:
            width, height = min(width, VAE_TILE), min(height, VAE_TILE)
        return family_of(preset).stage_working_memory("decode", width, height, dtype or self._decode_dtype(preset),
                                                      False)

    # ----- running -----

    def encode(self, preset, task: str, prompt: str, negative_prompt: str, guidance_scale: float,
               clip_skip: int = 1, loras: tuple[AppliedLora, ...] = ()) -> tuple[Conditioning, list[str]]:
        """The embeddings of prompts in A1111's syntax (weights, BREAK; extra-network tags already taken out),
        of any length: encoded window by window and concatenated. `clip_skip` is A1111's (2 = the text
        encoder's second-to-last layer; SD 1.x only). The LoRAs' text-encoder layers apply for this stage."""
        guidance = guidance_scale > 1

        family = family_of(preset)

        def work(models, plan):
            pipe = self.models.assemble(preset, task, pipeline_components(models))
            with torch.inference_mode():
                if family.clip_skip and clip_skip > 1:
                    layers = family.text_encoder_layers(pipe)
                    if clip_skip > layers:  # the check before the queue could not read the config
                        raise InvalidRequest([clip_skip_too_large(clip_skip, layers)])
                options = family.prompt_options(preset)
                embeds = family.encode_prompt(pipe, prompt, negative_prompt or "", guidance,
                                              clip_skip if family.clip_skip else 1, self.manager.device, **options)
            return Conditioning(embeds), family.prompt_notes(pipe, prompt, negative_prompt or "", guidance,
                                                             **options)

        return self.run_stage(lambda tiled: self.plan_encode(preset, task, guidance, loras), work,
                              **stage_fallbacks(preset, "encode"))

    def denoise(self, preset, task: str, width: int, height: int, guidance: bool,
                call: Callable[..., torch.Tensor], loras: tuple[AppliedLora, ...] = (),
                controls: PassControls | None = None, preview_decoder: ModelKey | None = None) -> torch.Tensor:
        """`call(pipe, preview_decoder)` runs the pipeline with output_type="latent" and returns the latents
        (`preview_decoder`: the leased TAESD, or None). The LoRAs' denoiser layers apply for this stage. With
        `controls`, the pipeline is the family's ControlNet pipeline and `pipe.controlnet` the units
        (ControlUnits), whose clock `call` sets and advances."""
        family = family_of(preset)

        def work(models, plan):
            units = None
            if controls is not None:
                nets = [models[role] for role in controls.roles()]
                units = ControlUnits(nets, list(controls.settings), clock=None, guidance=guidance)
            pipe = self.models.assemble(preset, task, pipeline_components(models), controlnet=units)
            with vae_tiling(models.get(family.vae), plan.vae_tiling), adapter_residuals(models[family.denoiser], units):
                return call(pipe, models.get(PREVIEW_DECODER))

        latents = self.run_stage(
            lambda tiled: self.plan_denoise(preset, task, width, height, guidance, tiled, loras, controls,
                                            preview_decoder), work,
            can_tile=task != "text2img", **stage_fallbacks(preset, "denoise"))
        if has_nan_or_inf(latents):
            raise denoiser_nan_error(preset, self.manager.dtype)
        return latents

    def decode(self, preset, task: str, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents -> image tensor in [-1, 1] on the CPU. A VAE in half precision that gives NaN or inf (it
        overflowed) decodes again in float32, as A1111 does, with one warning in the log; NaN or inf even in
        float32 raises NumericalError."""
        image, dtype = self._decode(preset, task, latents, width, height, in_float32=False)
        if has_nan_or_inf(image) and dtype != torch.float32:
            log.warning("%s: the VAE gave NaN or inf in %s; decoding again in float32", preset.name,
                        dtype_name(dtype))
            image, dtype = self._decode(preset, task, latents, width, height, in_float32=True)
        if has_nan_or_inf(image):
            raise NumericalError(f"The VAE of {preset.label} gave NaN (invalid) values even in float32, so there "
                                 "is no image: its weights are likely broken. Use another preset, or another VAE.")
        return image

    def _decode(self, preset, task: str, latents: torch.Tensor, width: int, height: int,
                in_float32: bool) -> tuple[torch.Tensor, torch.dtype]:
        """(image, the dtype the VAE decoded in). `in_float32`: the VAE is upcast for this decode whatever its
        family says."""
        family = family_of(preset)

        def work(models, plan):
            vae = models[family.vae]
            with vae_tiling(vae, plan.vae_tiling), torch.inference_mode():
                image, dtype = family.decode_latents(vae, latents, self.manager.device)
                return image.float().cpu(), dtype

        return self.run_stage(lambda tiled: self.plan_decode(preset, task, width, height, tiled, in_float32), work,
                              can_tile=True)

    def check(self, preset, task: str, images: torch.Tensor) -> list[bool]:
        """Which images the safety checker flags (none when the preset has no checker). It runs on its own, as
        SD's pipelines run it, so that it works for every architecture (SDXL's pipelines have no checker)."""
        def work(models, plan):
            pil = VaeImageProcessor().postprocess(images, output_type="pil")
            clip_input = models["feature_extractor"](pil, return_tensors="pt").pixel_values
            with torch.inference_mode():
                _, flagged = models["safety_checker"](
                    images=images.to(self.manager.device),
                    clip_input=clip_input.to(self.manager.device, self.manager.dtype),
                )
            return [bool(flag) for flag in flagged]

        plan = self.plan_check(preset, task)
        if plan is None:
            return [False] * len(images)
        return self.run_stage(lambda tiled: plan, work)

    def run_stage(self, plan_for: Callable[[bool], StagePlan], work: Callable[[dict, StagePlan], Any],
                  can_tile: bool = False, storable: tuple[str, ...] = (),
                  streamable: tuple[str, ...] = ()) -> Any:
        """Run `work(models, plan)` holding the plan's models on the device. Out of memory (our budget or the
        device's own): VAE tiling first, then idle models off the device, then the `storable` models stored in
        float8 (kept so: the next stages and images fit too), then accelerate's model CPU offload (CUDA only), then
        the `streamable` models' blocks streamed from RAM, then a clear message."""
        attempts = ["as planned"] + (["with VAE tiling"] if can_tile else []) + ["with idle models off the device"]
        attempts += ["with float8 storage"] if storable else []
        if self.manager.device.type == "cuda":
            attempts.append("with model CPU offload")
        attempts += ["with block streaming"] if streamable else []
        failure, tiled, stored = "", False, False
        for attempt in attempts:
            tiled = tiled or attempt == "with VAE tiling"
            stored = stored or attempt == "with float8 storage"
            if attempt == "with idle models off the device":
                self.manager.offload_idle()
            # planned again for each attempt: what the last one dropped (a model that carried this job's LoRAs)
            # must be planned for again
            plan = plan_for(tiled)
            if stored:
                plan = replace(plan, storage={role: FLOAT8 for role in storable if role in plan.keys})
            try:
                if attempt == "with model CPU offload":
                    return self._run_offloaded(plan, work)
                if attempt == "with block streaming":
                    return self._run_streamed(plan, work, frozenset(streamable))
                with self.manager.use(plan.keys, plan.working_memory, patches=plan.patches,
                                      dtypes=plan.dtypes, storage=plan.storage) as models:
                    return work(models, plan)
            except (torch.OutOfMemoryError, OutOfMemoryBudget) as error:
                failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            # Outside the except block: the failed attempt's traceback, and the activations its frames hold, are
            # gone by now, so this really gives their memory back before the next attempt.
            release_memory(self.manager.device)
        raise OutOfMemoryBudget(
            f"Out of memory on {self.manager.device} in the {plan.stage} stage, even {attempts[-1]} "
            f"(it needs about {format_bytes(plan.working_memory)} of working memory besides the weights). "
            f"Try a smaller size or batch, or a smaller preset. ({failure})"
        )

    def _run_offloaded(self, plan: StagePlan, work):
        """accelerate's model CPU offload, as a placement of the manager's (ModelManager.model_offload): the
        models wait in RAM and each is on the device only while its forward runs. A stage's keys come in its
        family's order, the order the models run. Without the live previews' TAESD: its hook would swap the UNet
        out at every preview (and `decode` is not its forward); previews there are Fast ones."""
        keys = {role: key for role, key in plan.keys.items() if role != PREVIEW_DECODER}
        with self.manager.model_offload(keys, plan.working_memory, patches=plan.patches, dtypes=plan.dtypes,
                                        storage=plan.storage) as models:
            return work(models, plan)

    def _run_streamed(self, plan: StagePlan, work, streamed: frozenset[str]):
        """The `streamed` models' blocks streamed from RAM one at a time (ModelManager.block_streaming), the
        others on the device."""
        with self.manager.block_streaming(plan.keys, streamed, plan.working_memory, patches=plan.patches,
                                          dtypes=plan.dtypes, storage=plan.storage) as models:
            return work(models, plan)


def stage_fallbacks(preset, stage: str) -> dict[str, tuple[str, ...]]:
    """run_stage's fallbacks for a model too large for the device that its family allows in `stage`: the models
    that may be stored in float8 (T5 when encoding, the transformer when denoising), and those whose blocks may
    stream from RAM."""
    family = family_of(preset)
    components = family.stage_components(stage, "text2img")
    return dict(storable=tuple(role for role in family.float8_storage if role in components),
                streamable=tuple(role for role in family.streamed_blocks if role in components))


def has_nan_or_inf(tensor: torch.Tensor) -> bool:
    """Whether any value is NaN or inf (one reduction, one sync on a GPU)."""
    return not bool(torch.isfinite(tensor).all())


def denoiser_nan_error(preset, dtype: torch.dtype) -> NumericalError:
    """What to say when denoising gave NaN or inf: the usual causes first, then the model itself."""
    model = (f"this model does not work in {dtype_name(dtype)} here" if dtype != torch.float32
             else "its weights may be broken")
    return NumericalError(
        f"Denoising with {preset.label} in {dtype_name(dtype)} gave NaN (invalid) values, so there is no image. Try "
        f"a lower CFG scale, another sampler, fewer steps, a smaller size or lower LoRA weights; if it happens "
        f"whatever you set, {model}: use another preset."
    )


def pipeline_components(models: dict[str, Any]) -> dict[str, Any]:
    """A stage's lease without the LoRA files leased to patch its models (and the ControlNets, which the pipeline
    gets as its units, and the live previews' TAESD)."""
    return {role: model for role, model in models.items()
            if role != PREVIEW_DECODER and not role.startswith((f"{LORA}:", f"{CONTROLNET}:"))}


def clip_skip_too_large(clip_skip: int, layers: int) -> str:
    return (f"Clip skip {clip_skip} is more than this model's text encoder has layers ({layers}): use at most "
            f"{layers}.")


@dataclass
class _Tiling:
    vae: Any
    on: bool

    def __enter__(self):
        if self.on and self.vae is not None:
            self._saved = (self.vae.tile_sample_min_size, self.vae.tile_latent_min_size)
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.vae.tile_sample_min_size = min(self.vae.tile_sample_min_size, VAE_TILE)
            self.vae.tile_latent_min_size = self.vae.tile_sample_min_size // factor
            self.vae.enable_tiling()

    def __exit__(self, *exc):
        if self.on and self.vae is not None:
            self.vae.disable_tiling()
            self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = self._saved


def vae_tiling(vae, on: bool) -> _Tiling:
    """Tiled VAE encode/decode for one stage; the VAE is shared, so it is switched back off afterwards."""
    return _Tiling(vae, on)


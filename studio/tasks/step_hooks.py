"""What a denoising pass calls at each step: progress and Stop, and (with a dedicated inpainting model, or soft
inpainting) the original image put back outside the mask at the noise level of the next evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from studio.core.jobs import JobControl
from studio.models.families import ModelFamily
from studio.tasks.soft_inpainting import SoftInpainting, kept_weight, latent_blend


def step_callback(job: JobControl, steps_done: list[int], steps: int, start: int, total: int, label: str):
    """diffusers' callback_on_step_end for one denoising pass of `steps` steps: counts the steps done (in
    `steps_done[0]`), reports them after the job's `start` steps of `total`, stops when cancelled."""

    def on_step_end(pipe, step, timestep, callback_kwargs):
        # diffusers calls this once per model evaluation: twice a step for Heun, DPM2 and DPM++ SDE
        done = min(steps, math.ceil((step + 1) / getattr(pipe.scheduler, "order", 1)))
        steps_done[0] = done
        job.report(start + done, total, f"{label}, step {done}/{steps}")
        if job.cancelled:
            pipe._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    return on_step_end


def input_sigma(scheduler, next_timestep: torch.Tensor, device) -> float | None:
    """The sigma of the level the model is given at its next evaluation, where the scheduler says it through its
    input scaling, 1 / sqrt(sigma² + 1), as the k-diffusion samplers do (it also covers the middle evaluation of DPM2
    and DPM++ SDE); None for the schedulers that leave their input unscaled (DDIM, DPM++ 2M, UniPC, LCM). Call it
    after the scheduler's step: most schedulers read their advanced step index, not `next_timestep`."""
    # on the latents' device (DPM2 keeps its interpolated sigmas there), in float32 (fp16 rounds 0.9996 to 1)
    probe = torch.ones(1, device=device, dtype=torch.float32)
    scale = float(scheduler.scale_model_input(probe, next_timestep)[0])
    return (1 / scale**2 - 1) ** 0.5 if scale < 1 else None


def noised_for_next_evaluation(scheduler, clean: torch.Tensor, noise: torch.Tensor,
                               next_timestep: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """`clean` noised to the level the model is given at its next evaluation (call it after the scheduler's step):
    by the k-diffusion sigma (input_sigma), where add_noise would use the next step's sigma instead of a midpoint's;
    by timestep for the other schedulers; by its sigma (`scale_noise`) for a flow-matching one."""
    if flow:
        return scheduler.scale_noise(clean, next_timestep[None], noise)
    sigma = input_sigma(scheduler, next_timestep, clean.device)
    if sigma is not None:
        return clean + noise * sigma
    return scheduler.add_noise(clean, noise, next_timestep[None])


def noise_to_signal(scheduler, next_timestep: torch.Tensor, flow: bool, device=None) -> float:
    """The noise-to-signal ratio of the level the model is given at its next evaluation (call after the step), soft
    inpainting's sigma: the k-diffusion sigma (input_sigma), sqrt((1 - ᾱ) / ᾱ) for the other discrete schedulers,
    s / (1 - s) for a flow-matching one (s its sigma: x = (1 - s) x0 + s noise)."""
    if flow:
        index = scheduler.step_index if scheduler.step_index is not None else 0
        s = float(scheduler.sigmas[min(index, len(scheduler.sigmas) - 1)])
        return s / max(1 - s, 1e-6)
    sigma = input_sigma(scheduler, next_timestep, device)
    if sigma is not None:
        return sigma
    alpha = float(scheduler.alphas_cumprod[int(next_timestep)])
    return ((1 - alpha) / alpha) ** 0.5


@dataclass(frozen=True)
class SoftBlend:
    """Soft inpainting's part of a pass (studio.tasks.soft_inpainting): its settings and the soft mask (L, at the
    working size, 255 = repaint)."""

    settings: SoftInpainting
    mask: Image.Image


def inpaint_step_hooks(pipe, family: ModelFamily, image: Image.Image, seed: int, then=None,
                       soft: SoftBlend | None = None, found: dict | None = None) -> dict[str, Any]:
    """The pipeline arguments for an inpaint (they take precedence over the plan's): a callback_on_step_end that
    puts the original image, noised to the level of the model's next evaluation, back outside the mask after every
    step, then calls `then` (progress, Stop). The model repaints the mask against the true surroundings. With
    `soft`, the original is blended in through the soft mask instead, by soft inpainting's schedule, and the last
    step's distance from the original (per latent cell) is left in `found["latent_distance"]` for the final paste.

    A1111 (its CFGDenoiser) and ComfyUI (KSamplerX0Inpaint) do the equivalent for every model, inpainting
    checkpoints included; diffusers does it only for plain 4-channel UNets (and SD 3 and FLUX), so those are left
    to it unless the blend is soft. Without it the embedded model's repainted background drifts in tint along a
    brush stroke (one clean shape in 78% of the calibration cases, 90% with it; see README).

    The original is encoded here, before the pipeline runs: where the models are offloaded to RAM, the VAE then
    has the device before the UNet, as when the pipeline encodes its own inputs."""
    if soft is None and not family.needs_known_region_blending(pipe):
        return {"callback_on_step_end": then} if then else {}
    generator = torch.Generator("cpu").manual_seed(seed)
    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    with torch.no_grad():
        # the pipeline's own encoding (it upcasts SDXL's fp16 VAE; SD 3 and FLUX scale and shift), as its own
        # blending uses
        original = pipe._encode_vae_image(pixels.to(pipe._execution_device, family.denoiser_of(pipe).dtype),
                                          generator=generator)
    noise = torch.randn(original.shape, generator=generator)
    soft_mask = None
    if soft is not None:  # the soft mask at the latents' size, a cell's mean
        cells = soft.mask.resize(tuple(original.shape[-1:-3:-1]), Image.Resampling.BOX)
        soft_mask = torch.from_numpy(np.asarray(cells, dtype=np.float32) / 255)[None, None]

    def on_step_end(pipe, step, timestep, callback_kwargs):
        packed = callback_kwargs["latents"]
        latents = family.preview_latents(packed, image.width, image.height, pipe.vae_scale_factor)
        clean = original.to(latents.device, latents.dtype)
        timesteps = pipe.scheduler.timesteps[-pipe.num_timesteps:]  # this run's (strength < 1 skips some)
        last = step + 1 >= len(timesteps)
        known = clean
        if not last:
            known = noised_for_next_evaluation(pipe.scheduler, clean, noise.to(latents.device, latents.dtype),
                                               timesteps[step + 1], family.flow_matching)
        if soft is None:
            keep = 1 - callback_kwargs["mask"][: len(latents)]  # the mask is doubled under CFG; 1 = repaint
            blended = keep * known + (1 - keep) * latents
        else:
            mask = soft_mask.to(latents.device, latents.dtype)
            if last:  # A1111's final blend leaves the latents as they are; only the unmasked cells are put back
                blended = torch.where(mask > 0, latents, clean)
                found["latent_distance"] = torch.linalg.vector_norm(
                    (blended - clean).float(), dim=1)[0].cpu().numpy()  # one image a pass
            else:
                sigma = noise_to_signal(pipe.scheduler, timesteps[step + 1], family.flow_matching, latents.device)
                blended = latent_blend(known, latents, kept_weight(mask, sigma, soft.settings).expand_as(latents),
                                       soft.settings.transition_contrast_boost)
        callback_kwargs["latents"] = family.packed_latents(pipe, blended, packed)
        return then(pipe, step, timestep, callback_kwargs) if then else callback_kwargs

    hooks = {"callback_on_step_end": on_step_end,
             "callback_on_step_end_tensor_inputs": ["latents"] if soft is not None else ["latents", "mask"]}
    if soft is not None and not family.takes_inpaint_channels(pipe):
        # a pipeline that puts the original back outside its (thresholded) mask itself (4-channel UNets, SD 3,
        # FLUX without Fill) is given everywhere the soft mask reaches, so that only the soft blend decides there; a
        # model conditioned on the mask (9-channel UNets, FLUX Fill) keeps the blurred mask, which its pipeline
        # thresholds at half for the model's mask input as for a hard inpaint (A1111 gives it unrounded)
        hooks["mask_image"] = soft.mask.point(lambda value: 255 if value else 0)
    return hooks

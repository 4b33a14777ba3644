"""What a denoising pass calls at each step: progress and Stop, and (with a dedicated inpainting model) the
original image put back outside the mask at the noise level of the next evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from studio.core.jobs import JobControl
from studio.models.families import ModelFamily


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


def noised_for_next_evaluation(scheduler, clean: torch.Tensor, noise: torch.Tensor,
                               next_timestep: torch.Tensor) -> torch.Tensor:
    """`clean` noised to the level the model is given at its next evaluation; call it after the scheduler's step
    (most schedulers read their advanced step index, not `next_timestep`). A k-diffusion sampler says that level
    through its input scaling, 1 / sqrt(sigma² + 1), which also covers the middle evaluation of DPM2 and DPM++ SDE,
    where add_noise would use the next step's sigma instead; other schedulers (DDIM, DPM++ 2M, UniPC, LCM) leave
    their input unscaled and noise by timestep."""
    # on the latents' device (DPM2 keeps its interpolated sigmas there), in float32 (fp16 rounds 0.9996 to 1)
    probe = torch.ones(1, device=clean.device, dtype=torch.float32)
    scale = float(scheduler.scale_model_input(probe, next_timestep)[0])
    if scale < 1:
        return clean + noise * (1 / scale**2 - 1) ** 0.5
    return scheduler.add_noise(clean, noise, next_timestep[None])


def inpaint_step_hooks(pipe, family: ModelFamily, image: Image.Image, seed: int, then=None) -> dict[str, Any]:
    """The pipeline arguments for an inpaint with a dedicated inpainting model (a 9-channel UNet): a callback_on_step_end that puts
    the original image, noised to the level of the model's next evaluation, back outside the mask after every
    step, then calls `then` (progress, Stop). The model repaints the mask against the true surroundings.

    A1111 (its CFGDenoiser) and ComfyUI (KSamplerX0Inpaint) do the equivalent for every model, inpainting
    checkpoints included; diffusers does it only for plain 4-channel UNets, so those are left to it. Without it the
    embedded model's repainted background drifts in tint along a brush stroke (one clean shape in 78% of the
    calibration cases, 90% with it; see README).

    The original is encoded here, before the pipeline runs: where the models are offloaded to RAM, the VAE then
    has the device before the UNet, as when the pipeline encodes its own inputs."""
    if not family.needs_known_region_blending(pipe):
        return {"callback_on_step_end": then} if then else {}
    generator = torch.Generator("cpu").manual_seed(seed)
    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    with torch.no_grad():
        # the pipeline's own encoding (it upcasts SDXL's fp16 VAE), as its 4-channel blending uses
        original = pipe._encode_vae_image(pixels.to(pipe._execution_device, family.denoiser_of(pipe).dtype), generator)
    noise = torch.randn(original.shape, generator=generator)

    def on_step_end(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        clean = original.to(latents.device, latents.dtype)
        keep = 1 - callback_kwargs["mask"][: len(latents)]  # the mask is doubled under CFG; 1 = repaint
        timesteps = pipe.scheduler.timesteps[-pipe.num_timesteps:]  # this run's (strength < 1 skips some)
        known = clean
        if step + 1 < len(timesteps):
            known = noised_for_next_evaluation(pipe.scheduler, clean, noise.to(latents.device, latents.dtype),
                                               timesteps[step + 1])
        callback_kwargs["latents"] = keep * known + (1 - keep) * latents
        return then(pipe, step, timestep, callback_kwargs) if then else callback_kwargs

    return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents", "mask"]}

"""Sampler names as AUTOMATIC1111 shows them, mapped to the diffusers scheduler configs that reproduce them.

A1111 (before 1.9) named a sampler and its noise schedule together ("DPM++ 2M Karras"); since 1.9 it writes them
apart ("Sampler: DPM++ 2M, Schedule type: Karras"). Our names are the combined ones, each one (sampler, schedule)
pair; the PNG fields are written the 1.9 way and read either way. The samplers and their schedule defaults are
A1111's table (modules/sd_samplers_kdiffusion.py), the diffusers classes the ones diffusers' docs map them to,
configured as close to A1111 as diffusers allows (known differences: A1111's DPM2 drops the next-to-last noise
level, diffusers' KDPM2 cannot; UniPC runs variant bh2, order 2, where A1111 runs bh1, order 3).

k-diffusion's samplers (all of A1111's but DDIM, UniPC and LCM) start at the model's highest noise level and
space the steps evenly down to the lowest ("Uniform"), which is diffusers' `timestep_spacing="linspace"`.
A preset's own scheduler overrides (e.g. SD-Turbo's "trailing") still win.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from studio.core.errors import InvalidRequest

AUTOMATIC, UNIFORM, KARRAS, EXPONENTIAL = "Automatic", "Uniform", "Karras", "Exponential"
_K_DIFFUSION = {"timestep_spacing": "linspace"}
# Every schedule sets all three flags: a model's config with use_karras_sigmas on must not make "Euler" Karras.
_NO_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_SIGMAS = {UNIFORM: _NO_SIGMAS, KARRAS: {**_NO_SIGMAS, "use_karras_sigmas": True},
           EXPONENTIAL: {**_NO_SIGMAS, "use_exponential_sigmas": True}}


@dataclass(frozen=True)
class Sampler:
    """One entry of the sampler menu: the diffusers scheduler, its config overrides, and the A1111 fields."""

    scheduler_class: type
    overrides: dict[str, Any] = field(default_factory=dict)
    a1111_sampler: str = ""
    schedule_type: str = AUTOMATIC


def _k(sampler: str, scheduler_class: type, schedule: str = UNIFORM, **overrides) -> Sampler:
    """A k-diffusion sampler of A1111's with the given noise schedule (the settings its class takes)."""
    accepted = inspect.signature(scheduler_class.__init__).parameters
    settings = {key: value for key, value in {**_K_DIFFUSION, **_SIGMAS[schedule], **overrides}.items() if key in accepted}
    return Sampler(scheduler_class, settings, sampler, schedule)


# k-diffusion's DPM++ 2M / 2M SDE: midpoint, second order, the last step to sigma 0; whatever a model's config says
_DPM_SOLVER = {"solver_order": 2, "solver_type": "midpoint", "final_sigmas_type": "zero", "euler_at_final": False,
               "use_lu_lambdas": False, "thresholding": False, "lower_order_final": True}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", **_DPM_SOLVER}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", **_DPM_SOLVER}

SCHEDULERS = MappingProxyType(
    {
        "DPM++ 2M Karras": _k("DPM++ 2M", DPMSolverMultistepScheduler, KARRAS, **_DPMPP_2M),
        "DPM++ 2M": _k("DPM++ 2M", DPMSolverMultistepScheduler, **_DPMPP_2M),
        "DPM++ SDE Karras": _k("DPM++ SDE", DPMSolverSDEScheduler, KARRAS),
        "DPM++ SDE": _k("DPM++ SDE", DPMSolverSDEScheduler),
        "DPM++ 2M SDE Karras": _k("DPM++ 2M SDE", DPMSolverMultistepScheduler, KARRAS, **_DPMPP_2M_SDE),
        "DPM++ 2M SDE Exponential": _k("DPM++ 2M SDE", DPMSolverMultistepScheduler, EXPONENTIAL, **_DPMPP_2M_SDE),
        "DPM++ 2M SDE": _k("DPM++ 2M SDE", DPMSolverMultistepScheduler, **_DPMPP_2M_SDE),
        "Euler a": _k("Euler a", EulerAncestralDiscreteScheduler),
        "Euler": _k("Euler", EulerDiscreteScheduler),
        "LMS Karras": _k("LMS", LMSDiscreteScheduler, KARRAS),
        "LMS": _k("LMS", LMSDiscreteScheduler),
        "Heun": _k("Heun", HeunDiscreteScheduler),
        "DPM2 Karras": _k("DPM2", KDPM2DiscreteScheduler, KARRAS),
        "DPM2": _k("DPM2", KDPM2DiscreteScheduler),
        "DPM2 a Karras": _k("DPM2 a", KDPM2AncestralDiscreteScheduler, KARRAS),
        "DPM2 a": _k("DPM2 a", KDPM2AncestralDiscreteScheduler),
        # A1111's UniPC: uniform in time, lower order at the end; but variant bh2, order 2, not A1111's bh1, order 3:
        # diffusers' bh1 returns NaN latents with a v-prediction model (measured on the embedded one)
        "UniPC": Sampler(UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 2, "lower_order_final": True,
                                                   **_K_DIFFUSION}, "UniPC"),
        # A1111's DDIM: evenly spaced steps from t=1 ("leading", offset 1), no clipping of the predicted sample
        # (latents are not pixels in [-1, 1]), and the step before the first uses alphas_cumprod[0].
        "DDIM": Sampler(DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
                                        "steps_offset": 1}, "DDIM"),
        "LCM": Sampler(LCMScheduler, {}, "LCM"),  # needs an LCM-distilled model (or LCM-LoRA)
    }
)
GENERAL_SCHEDULERS = tuple(name for name in SCHEDULERS if name != "LCM")

# What "Schedule type: Automatic" means for each A1111 sampler (its table's 'scheduler' option); others: Uniform.
# (keys in lower case: A1111's fields are matched without case)
_AUTOMATIC_SCHEDULE = {"dpm++ 2m": KARRAS, "dpm++ sde": KARRAS, "dpm++ 2m sde": EXPONENTIAL, "dpm2": KARRAS,
                       "dpm2 a": KARRAS}


# Flow-matching models (SD 3, FLUX) predict a velocity along a straight path from noise to image; their samplers
# step in sigma (= t) from 1 to 0 on the model's shifted schedule (SD 3: the config's `shift`; FLUX: shifted by the
# image's size, its `mu`), which Forge and ComfyUI call the "Simple" schedule. Under the names Forge shows: Euler
# (the models' own FlowMatchEulerDiscreteScheduler), DPM++ 2M and UniPC on flow sigmas.
SIMPLE = "Simple"


class _FlowSolver:
    """What the SD 3 and FLUX image-to-image and inpaint pipelines ask of a scheduler, for the multistep solvers on
    flow sigmas (diffusers gives these to FlowMatchEulerDiscreteScheduler only): `scale_noise`, the clean latents
    noised to a timestep (with flow sigmas, add_noise's (1 - sigma) x + sigma n), and `set_timesteps` taking the
    `sigmas` FLUX's pipelines always pass (its text-to-image pipeline drops them for a solver on flow sigmas; the
    others do not): the solver makes its own flow sigmas, shifted, for as many steps. FLUX's pipelines pass a `mu`
    (the size-dependent shift) always: a model with a static shift ignores it, as FlowMatchEulerDiscreteScheduler
    does (DPMSolverMultistepScheduler asserts dynamic shifting when given one)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        if num_inference_steps is None and sigmas is not None:
            num_inference_steps = len(sigmas)
        if not self.config.use_dynamic_shifting:
            mu = None
        return super().set_timesteps(num_inference_steps, device, mu=mu)

    def scale_noise(self, sample, timestep, noise):
        return self.add_noise(sample, noise, timestep)


class FlowDPMSolverMultistepScheduler(_FlowSolver, DPMSolverMultistepScheduler):
    pass


class FlowUniPCMultistepScheduler(_FlowSolver, UniPCMultistepScheduler):
    pass
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "time_shift_type": "exponential"}
FLOW_SCHEDULERS = MappingProxyType(
    {
        "Euler": Sampler(FlowMatchEulerDiscreteScheduler, {}, "Euler", SIMPLE),
        "DPM++ 2M": Sampler(FlowDPMSolverMultistepScheduler, {**_FLOW_SOLVER, **_DPMPP_2M}, "DPM++ 2M", SIMPLE),
        "UniPC": Sampler(FlowUniPCMultistepScheduler, {**_FLOW_SOLVER, "solver_type": "bh2", "solver_order": 2,
                                                       "lower_order_final": True}, "UniPC", SIMPLE),
    }
)


def samplers(flow: bool) -> MappingProxyType:
    """The sampler table of noise-prediction models, or (`flow`) of flow-matching ones."""
    return FLOW_SCHEDULERS if flow else SCHEDULERS


def check_scheduler(name: str, allowed: tuple[str, ...], preset_label: str, flow: bool = False) -> list[str]:
    if name in allowed:
        return []
    if name in SCHEDULERS or name in FLOW_SCHEDULERS:  # a real sampler, for other models
        return [f"Scheduler {name!r} does not work with {preset_label}. Choose one of: {', '.join(allowed)}."]
    return [f"Unknown scheduler {name!r}. Choose one of: {', '.join(allowed)}."]


def make_scheduler(name: str, base_config: dict[str, Any], preset_overrides: dict[str, Any] | None = None,
                   seed: int | None = None, flow: bool = False, shift: float | None = None):
    """A fresh scheduler built from the model's own config, so no state or override leaks between calls.
    `seed` seeds the Brownian noise of the SDE samplers that draw their own (as A1111 seeds it with the image's
    seed), so the same seed gives the same image. `flow`: a flow-matching model's sampler (FLOW_SCHEDULERS);
    `shift` replaces its schedule's shift (None: the model's own, FLUX's by the image's size)."""
    table = samplers(flow)
    if name not in table:
        raise InvalidRequest([f"Unknown scheduler {name!r}. Choose one of: {', '.join(table)}."])
    sampler = table[name]
    accepted = inspect.signature(sampler.scheduler_class.__init__).parameters
    # as keyword arguments: from_config ignores config keys it was told were defaults ("_use_default_values");
    # a preset's overrides only where the class takes them
    overrides = {**sampler.overrides, **{key: value for key, value in (preset_overrides or {}).items() if key in accepted}}
    if seed is not None and "noise_sampler_seed" in accepted:
        overrides["noise_sampler_seed"] = seed
    config = dict(base_config)
    if flow:
        settings = flow_shift_settings(config, sampler, shift)
        overrides |= {key: value for key, value in settings.items() if key in accepted}
        # the pipeline reads base_shift and max_shift from any scheduler's config (kept there as extra keys)
        config |= {key: value for key, value in settings.items() if key not in accepted}
    return sampler.scheduler_class.from_config(config, **overrides)


def flow_shift_settings(config: dict[str, Any], sampler: Sampler, shift: float | None) -> dict[str, Any]:
    """The shift settings of a flow sampler. The model's own: its config's `shift` (`flow_shift` for the solvers),
    or its size-dependent shift (FLUX: `use_dynamic_shifting`, the pipeline passes mu = log(shift) from the
    image's token count, between base_shift and max_shift). A shift of the user's: the same at every size, as a
    dynamic shift whose bounds are both log(shift) (the FLUX pipeline always passes a mu; this makes it that)."""
    euler = sampler.scheduler_class is FlowMatchEulerDiscreteScheduler
    if shift is None:
        return {} if euler else {"flow_shift": config.get("shift", 1.0)}
    if not config.get("use_dynamic_shifting"):
        return {"shift": shift} if euler else {"flow_shift": shift}
    return {"base_shift": math.log(shift), "max_shift": math.log(shift), "time_shift_type": "exponential",
            **({} if euler else {"flow_shift": shift})}


def evaluations_per_step(name: str, flow: bool = False) -> int:
    """Model evaluations per denoising step: 2 for Heun, DPM2 and DPM++ SDE (diffusers' scheduler `order`)."""
    table = samplers(flow)
    return getattr(table[name].scheduler_class, "order", 1) if name in table else 1


def a1111_sampler_fields(name: str, flow: bool = False) -> dict[str, str]:
    """The PNG fields A1111 1.9 (and Forge) write for one of our sampler names."""
    sampler = samplers(flow)[name]
    return {"Sampler": sampler.a1111_sampler, "Schedule type": sampler.schedule_type}


def scheduler_from_a1111(sampler: str, schedule_type: str | None = None) -> str | None:
    """Our sampler name for A1111's fields, or None when we have no equivalent. Without a schedule type (A1111
    before 1.9) the sampler name carries it ("DPM++ 2M Karras"), and a bare name meant the uniform schedule.
    Forge's flow-matching samplers ("Euler", "Simple") have the same names as their noise-prediction
    namesakes: the preset's family says which table a name runs from."""
    key = sampler.strip().lower()  # A1111's fields are matched without case
    schedule = (schedule_type or "").strip().lower()
    if schedule == SIMPLE.lower():
        return {name.lower(): name for name in FLOW_SCHEDULERS}.get(key)
    combined = {name.lower(): name for name in SCHEDULERS}.get(key)
    if not schedule or (combined and schedule == AUTOMATIC.lower() and key not in _AUTOMATIC_SCHEDULE):
        return combined  # a combined name ("DPM++ 2M Karras", also as Forge writes it beside "Automatic")
    if schedule == AUTOMATIC.lower():
        schedule = _AUTOMATIC_SCHEDULE.get(key, UNIFORM).lower()
    for name, entry in SCHEDULERS.items():
        if entry.a1111_sampler.lower() == key and entry.schedule_type.lower() in (schedule, AUTOMATIC.lower()):
            return name
    return None

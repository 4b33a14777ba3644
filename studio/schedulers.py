"""Sampler names as AUTOMATIC1111 shows them, mapped to diffusers schedulers."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from .errors import InvalidRequest

# name -> (scheduler class, config overrides)
SCHEDULERS = MappingProxyType(
    {
        "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "DPM++ 2M": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
        "Euler a": (EulerAncestralDiscreteScheduler, {}),
        "Euler": (EulerDiscreteScheduler, {}),
        "UniPC": (UniPCMultistepScheduler, {}),
        "DDIM": (DDIMScheduler, {}),
        "LCM": (LCMScheduler, {}),  # needs an LCM-distilled model (or LCM-LoRA)
    }
)
GENERAL_SCHEDULERS = tuple(name for name in SCHEDULERS if name != "LCM")


def schedulers_for(preset) -> tuple[str, ...]:
    """The schedulers a preset allows: its own list, else every general-purpose one (not LCM)."""
    return preset.schedulers or GENERAL_SCHEDULERS


def check_scheduler(name: str, preset) -> list[str]:
    allowed = schedulers_for(preset)
    if name in allowed:
        return []
    if name in SCHEDULERS:
        return [f"Scheduler {name!r} does not work with preset {preset.name!r}. Choose one of: {', '.join(allowed)}."]
    return [f"Unknown scheduler {name!r}. Choose one of: {', '.join(allowed)}."]


def make_scheduler(name: str, base_config: dict[str, Any], preset_overrides: dict[str, Any] | None = None):
    """A fresh scheduler built from the model's own config, so no state or override leaks between calls."""
    if name not in SCHEDULERS:
        raise InvalidRequest([f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}."])
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(dict(base_config), **{**(preset_overrides or {}), **overrides})


# A1111 writes "Sampler: DPM++ 2M, Schedule type: Karras"; older versions wrote "Sampler: DPM++ 2M Karras".
def a1111_sampler_fields(name: str) -> dict[str, str]:
    if name.endswith(" Karras"):
        return {"Sampler": name.removesuffix(" Karras"), "Schedule type": "Karras"}
    return {"Sampler": name}


def scheduler_from_a1111(sampler: str, schedule_type: str | None = None) -> str | None:
    """Our scheduler name for an A1111 sampler (and schedule type), or None when we have no equivalent."""
    candidate = f"{sampler} Karras" if (schedule_type or "").lower() == "karras" else sampler
    return candidate if candidate in SCHEDULERS else None

"""A preset's card, and the sampling settings (scheduler, steps, CFG) fitted to it, for every tab."""

from __future__ import annotations

import gradio as gr

from components.running import user_error
from studio.errors import StudioError
from studio.presets import ModelPreset, PresetCatalog
from studio.schedulers import schedulers_for


def preset_card(preset: ModelPreset) -> str:
    if preset.checkpoint is not None:
        where = f"single-file checkpoint {preset.checkpoint.name}" + (
            ", works offline" if preset.is_local else f", configs from {hub_link(preset.config_source)}")
    else:
        where = "built in, works offline" if preset.is_local else hub_link(preset.repo)
    return f"**{preset.label}** — {preset.description} <br><small>{where}</small>"


def hub_link(repo: str) -> str:
    return f"[{repo}](https://huggingface.co/{repo})"


def chosen_preset(presets: PresetCatalog, name: str) -> ModelPreset:
    try:
        return presets.get(name)
    except StudioError as error:  # a typed-in name: the engine's message lists the real presets
        raise user_error(error, "Unknown preset") from None


def sampling_updates(preset: ModelPreset, limits, scheduler=None, steps=None, guidance=None) -> tuple:
    """Card, scheduler, steps and CFG fitted to `preset`; values given (and allowed) are kept."""
    allowed = list(schedulers_for(preset))
    return (
        preset_card(preset),
        gr.Dropdown(choices=allowed, value=scheduler if scheduler in allowed else preset.default_scheduler),
        gr.Slider(minimum=1, maximum=min(preset.max_steps, limits.max_steps), value=steps or preset.default_steps),
        gr.Slider(value=preset.default_guidance if guidance is None else guidance),
    )


def prompt_hint(engine, preset_name: str, prompt: str | None) -> str:
    """Under the prompt, for a model that lists what it knows: the words it knows, and the typed words it has
    never seen. Empty for the other models."""
    known = engine.vocabulary_hint(preset_name)
    if not known:
        return ""
    unknown = engine.unknown_words(preset_name, prompt or "")
    warning = ("**Never seen by this model, so they do not steer it: " + ", ".join(f"“{word}”" for word in unknown)
               + ".** " if unknown else "")
    return warning + known

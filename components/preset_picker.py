"""A preset's card, and the sampling settings (scheduler, steps, CFG) fitted to it, for every tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from components.event_options import INSTANT
from components.running import user_error
from studio.core.errors import StudioError
from studio.models.families import family_of, samplers_for
from studio.models.presets import ModelPreset, PresetCatalog


def preset_card(preset: ModelPreset) -> str:
    if preset.checkpoint is not None:
        where = f"single-file checkpoint {preset.checkpoint.name}" + (
            ", works offline" if preset.is_local else f", configs from {hub_link(preset.config_source)}")
    else:
        where = "built in, works offline" if preset.is_local else hub_link(preset.repo)
    notes = [where, family_of(preset).prompt_reading_of(preset)]
    if preset.licence:
        notes.append(f"Licence: {preset.licence}" + (" — gated: accept it on the Hub and log in (`hf auth login`) "
                                                      "before the first download" if preset.gated else ""))
    return f"**{preset.label}** — {preset.description} <br><small>{'<br>'.join(notes)}</small>"


@dataclass
class ModelAvailability:
    """Under a preset's card, for a preset whose model files cannot be had here (not downloaded, and the Hub out of
    reach; a checkpoint file missing): why, in one sentence, and the command that downloads the files, to copy.
    Said as soon as the preset is picked, not after Generate."""

    note: gr.Markdown
    command: gr.Textbox
    engine: Any  # a SamplingEngine
    task: str  # the pipeline task whose files the tab needs ("text2img", "inpaint")

    @property
    def outputs(self) -> list:
        return [self.note, self.command]

    def updates(self, preset_name: str | None) -> tuple:
        note, command = unavailable_note(self.engine, preset_name, self.task)
        return gr.Markdown(note, visible=bool(note)), gr.Textbox(command, visible=bool(command))

    def follow(self, preset: gr.Dropdown) -> None:
        """Said again whenever the preset changes (picked, an example, a PNG's or the history's settings)."""
        preset.change(self.updates, preset, self.outputs, **INSTANT)

    def on_load(self, demo: gr.Blocks, preset: gr.Dropdown) -> None:
        """Read again on each page load: files downloaded since the server started count."""
        demo.load(self.updates, preset, self.outputs, **INSTANT)


def unavailable_note(engine, preset_name: str | None, task: str) -> tuple[str, str]:
    """(the note, the download command) for a preset whose model cannot be had here; ("", "") otherwise, and for
    a typed-in unknown name (the request's check names that)."""
    if preset_name not in engine.presets:
        return "", ""
    unavailable = engine.unavailable_model(engine.presets.get(preset_name), task)
    if unavailable is None:
        return "", ""
    return f"⚠️ **{unavailable.reason}**", unavailable.command or ""


def build_model_availability(engine, preset: ModelPreset, task: str) -> ModelAvailability:
    """The note and the command box for `preset` as it stands now (see ModelAvailability); build it under the
    card."""
    note, command = unavailable_note(engine, preset.name, task)
    return ModelAvailability(
        gr.Markdown(note, visible=bool(note), elem_classes="model-unavailable"),
        gr.Textbox(command, label="Command that downloads the files it needs", lines=2, max_lines=6,
                   interactive=False, buttons=["copy"], visible=bool(command), elem_classes="download-command"),
        engine, task)


def hub_link(repo: str) -> str:
    return f"[{repo}](https://huggingface.co/{repo})"


def chosen_preset(presets: PresetCatalog, name: str) -> ModelPreset:
    try:
        return presets.get(name)
    except StudioError as error:  # a typed-in name: the engine's message lists the real presets
        raise user_error(error, "Unknown preset") from None


def sampling_updates(preset: ModelPreset, limits, scheduler=None, steps=None, guidance=None) -> tuple:
    """Card, scheduler, steps and CFG fitted to `preset`; values given (and allowed) are kept."""
    allowed = list(samplers_for(preset))
    return (
        preset_card(preset),
        gr.Dropdown(choices=allowed, value=scheduler if scheduler in allowed else preset.default_scheduler),
        gr.Slider(minimum=1, maximum=min(preset.max_steps, limits.max_steps), value=steps or preset.default_steps),
        gr.Slider(value=preset.default_guidance if guidance is None else guidance),
    )


def shown_hint(text: str, **options) -> gr.Markdown:
    """The prompt hint's Markdown, hidden while it says nothing (a Hub preset: no vocabulary), which would otherwise
    leave an empty gap under the prompt."""
    return gr.Markdown(text, visible=bool(text), **options)


def prompt_hint(engine, preset_name: str, prompt: str | None, controls: tuple = ()) -> str:
    """Under the prompt, for a model that lists what it knows: the words it knows, and the typed words it has
    never seen (those a ControlNet unit of `controls` was trained with count as known). Empty for the other
    models."""
    known = engine.vocabulary_hint(preset_name)
    if not known:
        return ""
    unknown = engine.unknown_words(preset_name, prompt or "", controls)
    warning = ("**Never seen by this model, so they do not steer it: " + ", ".join(f"“{word}”" for word in unknown)
               + ".** " if unknown else "")
    return warning + known

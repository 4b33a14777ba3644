"""A PNG's A1111 parameters back into a request: "Send parameters to the form" and the history's thumbnails.
What the studio lacks (a sampler, a model, a LoRA file) is named, and the form keeps its own value."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from studio.a1111.controlnet import read_controlnet_fields
from studio.a1111.metadata import parse_float, parse_parameters
from studio.models.controlnets import ControlNetCatalog
from studio.models.families import family_of
from studio.models.loras import (
    LoraCatalog,
)
from studio.models.presets import PresetCatalog
from studio.models.upscalers import UpscalerCatalog
from studio.tasks.control import unit_from_fields
from studio.tasks.generation import TextToImageRequest
from studio.tasks.hires import (
    HiresFix,
    hires_from_parameters,
)
from studio.tasks.requests import SamplingRequest
from studio.tasks.sampling import hash_entry_name, model_names, plain_model_name


def sampling_fields_from_parameters(params, presets: PresetCatalog, current: SamplingRequest,
                                    loras: LoraCatalog | None = None,
                                    controlnets: ControlNetCatalog | None = None) -> tuple[dict, list[str]]:
    """The fields every request has, from parsed A1111 parameters, and notes on what could not be taken over.
    Fields the text lacks, and a sampler or model the studio does not have, keep their `current` values. The
    prompt keeps its <lora:...> tags; a LoRA that is not here, or not the file the image was made with (its
    "Lora hashes"), is named."""
    notes = []
    if params.sampler and params.scheduler is None:
        notes.append(f"The image was made with sampler {params.sampler}, which this studio does not have; the "
                     f"sampler stays {current.scheduler}.")
    preset = current.preset
    wanted = plain_model_name(params.model or "")
    # a preset's own name first; then, as A1111 writes, a checkpoint file's stem ("dreamshaper_8" is the preset
    # "dreamshaper-8")
    matching = ([name for name in presets.names if plain_model_name(name) == wanted]
                or [candidate.name for candidate in presets if wanted in model_names(candidate)])
    if matching:
        preset = matching[0]
    elif params.model:
        notes.append(f"The image was made with model {params.model!r}, which is not one of the presets here; the "
                     f"model stays {current.preset}.")
    clip_skip = params.clip_skip or 1  # A1111 writes it only when it is not 1
    if clip_skip > 1 and not family_of(presets.get(preset)).clip_skip:  # A1111's setting is global: SDXL PNGs carry it
        notes.append(f"The image says clip skip {clip_skip}, which A1111 ignores for {presets.get(preset).label} as "
                     "this studio does: it is 1 here.")
        clip_skip = 1
    fields = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        preset=preset,
        scheduler=params.scheduler or current.scheduler,
        steps=params.steps or current.steps,
        guidance_scale=params.guidance_scale if params.guidance_scale is not None else current.guidance_scale,
        seed=params.seed if params.seed is not None else current.seed,
        batch_size=1,
        clip_skip=clip_skip,
        # Forge's fields for flow-matching models; without them the model's own
        distilled_guidance=parse_float(params.extra.get("Distilled CFG Scale")),
        shift=parse_float(params.extra.get("Shift")),
    )
    controls, control_notes = controls_from_parameters(params.extra, controlnets or ControlNetCatalog([]))
    fields["controls"] = controls
    return fields, notes + lora_notes(params.extra.get("Lora hashes", ""), loras or LoraCatalog({})) + control_notes


def controls_from_parameters(extra: dict[str, str], controlnets: ControlNetCatalog) -> tuple[tuple, list[str]]:
    """The ControlNet units an image's "ControlNet N" fields describe, without their control images (a PNG does
    not hold them), and notes: that the images must be given again, and each model not offered here."""
    units, notes = [], []
    for fields in read_controlnet_fields(extra):
        unit, note = unit_from_fields(fields, controlnets)
        if unit is not None:
            units.append(unit)
        notes.append(note)
    return tuple(units), list(dict.fromkeys(notes))


def lora_notes(hashes: str, loras: LoraCatalog) -> list[str]:
    """Notes on an image's "Lora hashes" ("name: hash, name: hash") against the LoRAs here."""
    notes = []
    written_names = {hash_entry_name(name): name for name in loras.names}
    for entry in filter(None, (part.strip() for part in hashes.split(","))):
        name, _, written = (value.strip() for value in entry.rpartition(":"))
        name = name if name in loras else written_names.get(name, name)
        if name not in loras:
            notes.append(f"The image was made with LoRA {name!r} (hash {written}), which is not in this studio: add "
                         f"its file to loras/, or take <lora:{name}:…> out of the prompt.")
            continue
        preset = loras.get(name)
        if preset.repo is None:
            try:
                here = loras.short_hash(Path(preset.file))
            except OSError:
                notes.append(f"LoRA {name!r}'s file {preset.file} cannot be read now.")
                continue
            if written and here != written:
                notes.append(f"LoRA {name!r} here has hash {here}; the image was made with hash {written}, another "
                             "version of it: the result will differ.")
    return notes


def request_from_parameters(text: str, presets: PresetCatalog, current: TextToImageRequest,
                            upscalers: UpscalerCatalog | None = None,
                            loras: LoraCatalog | None = None,
                            controlnets: ControlNetCatalog | None = None) -> tuple[TextToImageRequest, list[str]]:
    """A text-to-image form filled from an image's A1111 parameters, and notes on what could not be taken over.
    Hires. fix is on when the text has its fields (its upscaler found by our name or A1111's), off otherwise.

    The style is reset to "None" because the stored prompt already has the style applied.
    """
    params = parse_parameters(text)
    fields, notes = sampling_fields_from_parameters(params, presets, current, loras, controlnets)
    width, height = params.width or current.width, params.height or current.height

    def find_upscaler(written: str) -> str | None:
        found = upscalers.find(written) if upscalers else None
        return found.name if found else None

    hires, hires_notes = hires_from_parameters(params.extra, width, height, find_upscaler,
                                               current.hires or HiresFix())
    return replace(current, **fields, width=width, height=height, style="None", hires=hires), notes + hires_notes

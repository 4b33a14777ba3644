"""Generation parameters in PNG files, in AUTOMATIC1111's format (a tEXt chunk named "parameters").

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: ...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from studio.a1111.schedulers import a1111_sampler_fields, scheduler_from_a1111

# "Key: value" pairs; a value with a comma is JSON-quoted (as A1111 does).
_PARAM = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


@dataclass
class GenerationParameters:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    scheduler: str | None = None  # our scheduler name, when A1111's sampler maps to one
    sampler: str | None = None  # A1111's sampler (and schedule type) as written, e.g. "DPM fast, Automatic"
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    model_hash: str | None = None
    clip_skip: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # every other field, as written


def format_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    version: str,
    extra: dict[str, object] | None = None,
    flow: bool = False,
) -> str:
    """`flow`: the sampler is a flow-matching model's (Forge's "Schedule type: Simple")."""
    fields: dict[str, object] = {"Steps": steps, **a1111_sampler_fields(scheduler, flow)}
    fields |= {"CFG scale": _number(guidance_scale), "Seed": seed, "Size": f"{width}x{height}"}
    if model_hash:
        fields["Model hash"] = model_hash
    fields |= {"Model": model, **(extra or {}), "Version": version}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> GenerationParameters:
    """Parse an A1111 parameters text (ours or A1111's own). Unknown fields land in `extra`."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        fields = {key.strip(): _unquote(value.strip()) for key, value in _PARAM.findall(lines.pop())}
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)

    params = GenerationParameters(prompt="\n".join(prompt_lines).strip(), negative_prompt="\n".join(negative_lines).strip())
    params.steps = parse_int(fields.pop("Steps", None))
    sampler = fields.pop("Sampler", None)
    schedule_type = fields.pop("Schedule type", None)
    if sampler:
        params.scheduler = scheduler_from_a1111(sampler, schedule_type)
        params.sampler = f"{sampler} ({schedule_type} schedule)" if schedule_type else sampler
    params.guidance_scale = parse_float(fields.pop("CFG scale", None))
    params.seed = parse_int(fields.pop("Seed", None))
    size = fields.pop("Size", None)
    if size and re.fullmatch(r"\d+x\d+", size):
        params.width, params.height = (int(v) for v in size.split("x"))
    params.model = fields.pop("Model", None)
    params.model_hash = fields.pop("Model hash", None)
    params.clip_skip = parse_int(fields.pop("Clip skip", None))
    params.extra = fields
    return params


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return Path(path)


def read_parameters(path: str | Path) -> str | None:
    """The parameters text of an image file, or None if it has none. Raises ValueError for non-images."""
    try:
        with Image.open(path) as image:
            image.load()
            text = image.info.get("parameters")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"This file could not be read as an image ({error}).") from error
    return text if isinstance(text, str) and text.strip() else None


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text or text.startswith('"')) else text


def _unquote(value: str) -> str:
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _number(value: float) -> str:
    return f"{value:g}"


def parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None

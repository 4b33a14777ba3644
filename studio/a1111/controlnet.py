"""The PNG fields A1111's ControlNet extension writes, one per unit (sd-webui-controlnet, internal_controlnet's
infotext: serialize_unit):

    ControlNet 0: "Module: scribble_xdog, Model: control_v11p_sd15_scribble [d4ba51ff], Weight: 1, Resize Mode:
    Crop and Resize, Processor Res: 512, Threshold A: 32, Threshold B: -1, Guidance Start: 0, Guidance End: 1,
    Pixel Perfect: False, Control Mode: Balanced"

The control image itself is not in the PNG (A1111 does not write it either)."""

from __future__ import annotations

import re
from dataclasses import dataclass

FIELD = re.compile(r"ControlNet (\d+)")
_ENTRY = re.compile(r"\s*([^:,]+):\s*([^,]*)")
_MODEL = re.compile(r"(.*?)(?: \[([0-9a-fA-F]+)\])?$")


@dataclass(frozen=True)
class ControlNetFields:
    """One unit as the PNG says it."""

    module: str
    model: str  # as written: a file or repo name
    model_hash: str | None = None
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    processor_res: int = 512
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"

    def text(self) -> str:
        model = f"{self.model} [{self.model_hash}]" if self.model_hash else self.model
        values = {"Module": self.module, "Model": model, "Weight": _number(self.weight),
                  "Resize Mode": self.resize_mode, "Processor Res": self.processor_res,
                  "Threshold A": _number(self.threshold_a), "Threshold B": _number(self.threshold_b),
                  "Guidance Start": _number(self.guidance_start), "Guidance End": _number(self.guidance_end),
                  "Pixel Perfect": self.pixel_perfect, "Control Mode": self.control_mode}
        return ", ".join(f"{key}: {value}" for key, value in values.items())


def controlnet_parameters(units: list[ControlNetFields]) -> dict[str, str]:
    """The PNG's fields for these units: "ControlNet 0", "ControlNet 1", ..."""
    return {f"ControlNet {index}": unit.text() for index, unit in enumerate(units)}


def read_controlnet_fields(extra: dict[str, str]) -> list[ControlNetFields]:
    """The units a PNG's fields describe (its "ControlNet N" entries, in N's order); entries that cannot be read
    are left out."""
    found = []
    for key, value in extra.items():
        match = FIELD.fullmatch(key)
        if match:
            unit = parse_unit(value)
            if unit is not None:
                found.append((int(match.group(1)), unit))
    return [unit for _, unit in sorted(found, key=lambda pair: pair[0])]


def parse_unit(text: str) -> ControlNetFields | None:
    values = {key.strip(): value.strip() for key, value in _ENTRY.findall(text)}
    if "Module" not in values or "Model" not in values:
        return None
    model, model_hash = _MODEL.fullmatch(values["Model"]).groups()
    try:
        return ControlNetFields(
            module=values["Module"], model=model, model_hash=model_hash,
            weight=float(values.get("Weight", 1)), resize_mode=values.get("Resize Mode", "Crop and Resize"),
            processor_res=int(float(values.get("Processor Res", 512))),
            threshold_a=float(values.get("Threshold A", -1)), threshold_b=float(values.get("Threshold B", -1)),
            guidance_start=float(values.get("Guidance Start", 0)), guidance_end=float(values.get("Guidance End", 1)),
            pixel_perfect=values.get("Pixel Perfect", "False") == "True",
            control_mode=values.get("Control Mode", "Balanced"))
    except ValueError:
        return None


def _number(value: float) -> str:
    return f"{value:g}"

"""Model presets and style presets, read from the YAML files in `presets/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InvalidRequest, UnknownPreset

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
FAMILIES = ("sd15", "sd21", "sdxl")


@dataclass(frozen=True)
class ModelPreset:
    """One model a user can pick: where its weights are and the settings it works best with."""

    name: str
    label: str
    family: str
    description: str
    repo: str | None = None  # Hugging Face Hub repo id ...
    local: Path | None = None  # ... or a diffusers folder on disk
    inpaint_repo: str | None = None  # a dedicated 9-channel inpainting checkpoint
    inpaint_local: Path | None = None
    variant: str | None = None  # e.g. "fp16": the file variant to load on GPUs
    inpaint_variant: str | None = None  # some inpainting repos ship only fp16 safetensors
    inpaint_strength: float = 1.0  # the denoising strength the inpainting checkpoint is meant to run at
    components: dict[str, str] = field(default_factory=dict)  # role -> another source, e.g. {"vae": "stabilityai/sd-vae-ft-mse"}
    safety_checker: bool = False  # the repo's own safety checker runs on every image
    safe_by_construction: bool = False  # cannot draw anything a safety checker looks for (the embedded shapes)
    public: bool = False  # on the allow-list of --public mode
    seconds_per_step: float = 0.05  # one denoising step of one native-size image on a GPU: ZeroGPU's booking
    default_steps: int = 25
    max_steps: int = 100
    default_guidance: float = 7.0
    default_width: int = 512
    default_height: int = 512
    min_size: int = 256
    max_size: int = 1024
    size_step: int = 8
    default_scheduler: str = "DPM++ 2M Karras"
    default_clip_skip: int = 1  # A1111's clip skip the model was trained with (anime models: 2)
    schedulers: tuple[str, ...] = ()  # allowed schedulers; empty = all but LCM
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    examples: tuple[str, ...] = ()  # prompts this model is known to handle, shown under the form

    @property
    def source(self) -> str:
        """What `from_pretrained` is given: the Hub repo id or the local folder."""
        return str(self.local) if self.local is not None else str(self.repo)

    @property
    def inpaint_source(self) -> str | None:
        if self.inpaint_local is not None:
            return str(self.inpaint_local)
        return self.inpaint_repo

    @property
    def is_local(self) -> bool:
        return self.local is not None


@dataclass(frozen=True)
class StylePreset:
    name: str
    prompt: str = "{prompt}"
    negative_prompt: str = ""

    def apply(self, prompt: str, negative_prompt: str) -> tuple[str, str]:
        styled = self.prompt.replace("{prompt}", prompt) if "{prompt}" in self.prompt else f"{prompt}, {self.prompt}"
        negative = ", ".join(part for part in (negative_prompt, self.negative_prompt) if part)
        return styled.strip(", "), negative


NO_STYLE = StylePreset(name="None")


class PresetCatalog:
    """The presets a server offers, in file order. Read-only after construction."""

    def __init__(self, presets: list[ModelPreset], default: str):
        self._presets = {preset.name: preset for preset in presets}
        if default not in self._presets:
            raise ValueError(f"Default preset {default!r} is not in the catalog ({', '.join(self._presets)}).")
        self.default = default

    @property
    def names(self) -> list[str]:
        return list(self._presets)

    def __iter__(self):
        return iter(self._presets.values())

    def __contains__(self, name: str) -> bool:
        return name in self._presets

    def get(self, name: str) -> ModelPreset:
        try:
            return self._presets[name]
        except KeyError:
            raise UnknownPreset(name, self.names) from None

    def only(self, names: list[str], default: str | None = None) -> PresetCatalog:
        """A catalog restricted to `names` (public mode's allow-list)."""
        kept = [self.get(name) for name in names]
        return PresetCatalog(kept, default or (self.default if self.default in names else kept[0].name))


class StyleCatalog:
    def __init__(self, styles: list[StylePreset]):
        self._styles = {NO_STYLE.name: NO_STYLE} | {style.name: style for style in styles}

    @property
    def names(self) -> list[str]:
        return list(self._styles)

    def get(self, name: str | None) -> StylePreset:
        if not name:
            return NO_STYLE
        try:
            return self._styles[name]
        except KeyError:
            raise InvalidRequest([f"Unknown style {name!r}. Available styles: {', '.join(self.names)}."]) from None


_PRESET_FIELDS = set(ModelPreset.__dataclass_fields__) - {"name"}


def _preset_from_yaml(name: str, entry: dict[str, Any], base_dir: Path) -> ModelPreset:
    unknown = set(entry) - _PRESET_FIELDS
    if unknown:
        raise ValueError(f"Preset {name!r}: unknown field(s) {sorted(unknown)}.")
    if ("repo" in entry) == ("local" in entry):
        raise ValueError(f"Preset {name!r}: give exactly one of 'repo' (Hub id) or 'local' (folder).")
    if entry.get("family") not in FAMILIES:
        raise ValueError(f"Preset {name!r}: family must be one of {FAMILIES}, not {entry.get('family')!r}.")
    values = dict(entry)
    for key in ("local", "inpaint_local"):
        if values.get(key) is not None:
            values[key] = (base_dir / values[key]).resolve()
    # A component source written as a relative path is a folder beside the presets file; otherwise a Hub repo id.
    values["components"] = {role: str((base_dir / source).resolve()) if source.startswith((".", "/")) else source
                            for role, source in (values.get("components") or {}).items()}
    values["schedulers"] = tuple(values.get("schedulers", ()))
    values["examples"] = tuple(values.get("examples", ()))
    preset = ModelPreset(name=name, **values)
    if not (preset.min_size <= preset.default_width <= preset.max_size):
        raise ValueError(f"Preset {name!r}: default_width outside [min_size, max_size].")
    if not (preset.min_size <= preset.default_height <= preset.max_size):
        raise ValueError(f"Preset {name!r}: default_height outside [min_size, max_size].")
    return preset


def load_presets(path: Path = PRESETS_DIR / "models.yaml") -> PresetCatalog:
    data = yaml.safe_load(Path(path).read_text())
    presets = [_preset_from_yaml(name, entry, Path(path).parent) for name, entry in data["presets"].items()]
    return PresetCatalog(presets, default=data["default"])


def load_styles(path: Path = PRESETS_DIR / "styles.yaml") -> StyleCatalog:
    data = yaml.safe_load(Path(path).read_text())
    return StyleCatalog([StylePreset(**entry) for entry in data["styles"]])

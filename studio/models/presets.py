"""Model presets and style presets, read from the YAML files in `presets/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from studio.core.errors import InvalidRequest, UnknownPreset
from studio.models.families import FAMILIES, family_named

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
@dataclass(frozen=True)
class ModelPreset:
    """One model a user can pick: where its weights are and the settings it works best with."""

    name: str
    label: str
    family: str
    description: str
    repo: str | None = None  # Hugging Face Hub repo id ...
    local: Path | None = None  # ... or a diffusers folder on disk
    checkpoint: Path | None = None  # ... or a single-file checkpoint (.safetensors), as AUTOMATIC1111 loads them
    config: str | None = None  # a checkpoint's configs: a diffusers repo id or folder (default: its family's base)
    inpaint_repo: str | None = None  # a dedicated 9-channel inpainting checkpoint
    inpaint_local: Path | None = None
    inpaint_checkpoint: Path | None = None  # ... as a single file (its configs: `config`, with 9 input channels)
    variant: str | None = None  # e.g. "fp16": the file variant to load on GPUs
    inpaint_variant: str | None = None  # some inpainting repos ship only fp16 safetensors
    inpaint_strength: float = 1.0  # the denoising strength the inpainting checkpoint is meant to run at
    components: dict[str, str] = field(default_factory=dict)  # role -> another source, e.g. {"vae": "stabilityai/sd-vae-ft-mse"}
    # a TAESD for live previews (repo id or folder); default: its family's; "none": Fast previews only
    preview_decoder: str | None = None
    safety_checker: bool = False  # the repo's own safety checker runs on every image
    safe_by_construction: bool = False  # cannot draw anything a safety checker looks for (the embedded shapes)
    oracle: bool = False  # draws the embedded family's shapes: evaluations read its images with the oracle
    public: bool = False  # on the allow-list of --public mode
    seconds_per_step: float = 0.05  # one denoising step of one native-size image on a GPU: ZeroGPU's booking
    default_steps: int = 25
    max_steps: int = 100
    default_guidance: float = 7.0
    inpaint_guidance: float | None = None  # the CFG the Inpaint tab starts at, where it differs (None: the same)
    # a guidance-distilled model's "Distilled CFG Scale" (FLUX.1-dev: 3.5); None: the model has none
    distilled_guidance: float | None = None
    inpaint_distilled_guidance: float | None = None  # ... for its inpainting model (FLUX.1-Fill-dev: 30)
    licence: str = ""  # a licence a user must know of before using the images (FLUX.1-dev's non-commercial one)
    gated: bool = False  # the Hub repo asks each account to accept its licence first: a token with access is needed
    non_commercial: bool = False  # its licence forbids commercial use: --public offers it only when told to
    t5_window: int | None = None  # tokens T5 reads where it is not the family's (FLUX.1 [schnell]: 256)
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
        """Where the weights are: the Hub repo id, the local folder or the checkpoint file."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        return str(self.local) if self.local is not None else str(self.repo)

    @property
    def inpaint_source(self) -> str | None:
        if self.inpaint_checkpoint is not None:
            return str(self.inpaint_checkpoint)
        if self.inpaint_local is not None:
            return str(self.inpaint_local)
        return self.inpaint_repo

    @property
    def config_source(self) -> str:
        """The diffusers repo or folder with the model's configs, tokenizer and scheduler (for a folder or repo:
        itself)."""
        if self.checkpoint is None:
            return self.source
        return self.config or family_named(self.family).checkpoint_config

    @property
    def inpaint_default_guidance(self) -> float:
        return self.default_guidance if self.inpaint_guidance is None else self.inpaint_guidance

    @property
    def inpaint_default_distilled_guidance(self) -> float | None:
        return self.inpaint_distilled_guidance if self.inpaint_distilled_guidance is not None else self.distilled_guidance

    @property
    def is_local(self) -> bool:
        """Runs without the Hub: a folder, or a checkpoint file whose configs are a folder."""
        return self.local is not None or (self.checkpoint is not None and Path(self.config_source).is_dir())


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
    if sum(key in entry for key in ("repo", "local", "checkpoint")) != 1:
        raise ValueError(f"Preset {name!r}: give exactly one of 'repo' (Hub id), 'local' (folder) or 'checkpoint' "
                         "(a .safetensors file).")
    if sum(key in entry for key in ("inpaint_repo", "inpaint_local", "inpaint_checkpoint")) > 1:
        raise ValueError(f"Preset {name!r}: give at most one of 'inpaint_repo', 'inpaint_local', 'inpaint_checkpoint'.")
    for key in ("checkpoint", "inpaint_checkpoint"):
        if key in entry and not str(entry[key]).lower().endswith(".safetensors"):
            raise ValueError(f"Preset {name!r}: {key} must be a .safetensors file, not {entry[key]!r} (a .ckpt "
                             "can run code when it is loaded; convert it first).")
    if "config" in entry and "checkpoint" not in entry:
        raise ValueError(f"Preset {name!r}: 'config' describes a 'checkpoint' file; a repo or folder has its own.")
    for role, source in (entry.get("components") or {}).items():
        if str(source).lower().endswith(".safetensors"):
            raise ValueError(f"Preset {name!r}: components.{role} must be a diffusers repo id or folder; a single "
                             f"{role} file ({source}) is not supported.")
    if entry.get("family") not in FAMILIES:
        raise ValueError(f"Preset {name!r}: family must be one of {tuple(FAMILIES)}, not {entry.get('family')!r}.")
    if "checkpoint" in entry and FAMILIES[entry["family"]].flow_matching:
        raise ValueError(f"Preset {name!r}: single-file {FAMILIES[entry['family']].label} checkpoints are not read "
                         "here yet; give the diffusers repo (`repo:`) or folder (`local:`) instead.")
    if "checkpoint" in entry and "config" not in entry and FAMILIES[entry["family"]].checkpoint_config is None:
        raise ValueError(f"Preset {name!r}: the {FAMILIES[entry['family']].label} family has no base configs for a "
                         "single-file checkpoint; give `config:` (a diffusers folder or repo that describes it).")
    values = dict(entry)
    for key in ("local", "inpaint_local", "checkpoint", "inpaint_checkpoint"):
        if values.get(key) is not None:
            values[key] = (base_dir / Path(values[key]).expanduser()).resolve()
    config = values.get("config")
    if config is not None and (str(config).startswith((".", "/", "~")) or (base_dir / config).is_dir()):
        values["config"] = str((base_dir / Path(config).expanduser()).resolve())  # a folder; otherwise a Hub id
    # A component source written as a relative path is a folder beside the presets file; otherwise a Hub repo id.
    values["components"] = {role: str((base_dir / source).resolve()) if source.startswith((".", "/")) else source
                            for role, source in (values.get("components") or {}).items()}
    decoder = values.get("preview_decoder")
    if decoder is not None and str(decoder).startswith((".", "/")):
        values["preview_decoder"] = str((base_dir / decoder).resolve())
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

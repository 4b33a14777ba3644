"""ControlNet models: the presets a control unit picks from (presets/controlnets.yaml), the manager's loader for them
(kind "controlnet"), the files each needs from the Hub, and `ControlUnits`, the module diffusers' ControlNet
pipelines call at every model evaluation. It runs a job's units as A1111's ControlNet extension does
(sd-webui-controlnet, scripts/hook.py): each with its weight, the steps it acts on (guidance start and end, as a
fraction of the pass's steps) and its control mode."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch
import yaml
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from studio.core.downloads import DownloadRequest
from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.model_records import ModelKey
from studio.models.families import FAMILIES, family_named
from studio.models.loading import cached_folder, unavailable
from studio.models.weights import root_weight_patterns, safetensors_bytes, weight_files

CONTROLNET = "controlnet"  # the manager's kind
PRESETS_FILE = Path(__file__).resolve().parents[2] / "presets" / "controlnets.yaml"
# a preset's kind -> its diffusers class: a ControlNet, xinsir's Union (one net, a control type per map) or a
# T2I-Adapter (run once per pass on its map; its features added inside the UNet's down blocks)
MODEL_CLASSES = {"controlnet": "ControlNetModel", "controlnet_union": "ControlNetUnionModel",
                 "t2i_adapter": "T2IAdapter"}
UNION, ADAPTER = "controlnet_union", "t2i_adapter"

BALANCED = "Balanced"
PROMPT_MORE_IMPORTANT = "My prompt is more important"
CONTROLNET_MORE_IMPORTANT = "ControlNet is more important"
CONTROL_MODES = (BALANCED, PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT)
# "My prompt is more important" and "ControlNet is more important" (soft injection): the ControlNet's output i is
# scaled by 0.825 ** (12 - i), A1111's table for SD 1.x's 13 outputs (the middle block, the last, at the full
# weight); a ControlNet with fewer outputs takes the table's first ones, as A1111 does for SDXL's 10 (hook.py:
# control_scales[:10], so SDXL's middle block gets 0.825 ** 3).
SOFT_INJECTION_BASE = 0.825
SOFT_INJECTION_OUTPUTS = 13
ADAPTER_SOFT_INJECTION = (0.25, 0.62, 0.825, 1.0)  # A1111's table for a T2I-Adapter's four features


@dataclass(frozen=True)
class ControlNetPreset:
    """One ControlNet a unit can use: the family it was trained for and where its weights are."""

    name: str
    label: str
    family: str
    kind: str = "controlnet"
    repo: str | None = None
    local: Path | None = None
    variant: str | None = None  # loaded on GPUs (fp16)
    preprocessor: str = "none"  # the one it was trained on: the form picks it with the model
    description: str = ""
    for_sketches: bool = False  # Sketch to image guides with it by default, for presets of its family
    # words its training prompts had that its family's captions lack: known to the prompt check while it guides
    words: tuple[str, ...] = ()
    # a Union model's control type for each preprocessor's map (xinsir's indices: 1 depth, 2 scribble/soft edge,
    # 3 canny/lineart); a unit whose preprocessor has none is refused
    control_types: tuple[tuple[str, int], ...] = ()

    def control_type_for(self, preprocessor: str) -> int | None:
        """The Union type the model reads a `preprocessor` map as (None: not a Union model, or no such type)."""
        return dict(self.control_types).get(preprocessor)

    @property
    def source(self) -> str:
        return str(self.local) if self.local is not None else str(self.repo)

    @property
    def key(self) -> ModelKey:
        """The manager's key: its kind (the class) as the part, its file variant as `config`."""
        return ModelKey(CONTROLNET, self.source, self.kind, config=self.variant or "")

    def variant_for(self, dtype: torch.dtype) -> str | None:
        return self.variant if dtype == torch.float16 else None

    def download_request(self, dtype: torch.dtype) -> DownloadRequest | None:
        """What to fetch from the Hub for it (None for a folder)."""
        if self.local is not None:
            return None
        return DownloadRequest(self.source, tuple(root_weight_patterns(self.variant_for(dtype))),
                               label=f"ControlNet {self.label!r}")


@dataclass(frozen=True)
class PreprocessorWeights:
    """The files a learned preprocessor (lineart, soft edge, depth) reads, and where they are."""

    name: str  # the preprocessor's
    files: tuple[str, ...]
    repo: str | None = None
    local: Path | None = None

    @property
    def source(self) -> str:
        return str(self.local) if self.local is not None else str(self.repo)

    def download_request(self) -> DownloadRequest | None:
        if self.local is not None:
            return None
        return DownloadRequest(self.source, self.files, label=f"the {self.name} preprocessor's weights")


class ControlNetCatalog:
    """The ControlNets a server offers, in file order, and the learned preprocessors' weights. Read-only after
    construction."""

    def __init__(self, presets: list[ControlNetPreset], weights: dict[str, PreprocessorWeights] | None = None):
        self._presets = {preset.name: preset for preset in presets}
        self.weights = MappingProxyType(dict(weights or {}))  # preprocessor name -> its files

    @property
    def names(self) -> list[str]:
        return list(self._presets)

    def __contains__(self, name: str) -> bool:
        return name in self._presets

    def __iter__(self):
        return iter(self._presets.values())

    def get(self, name: str) -> ControlNetPreset:
        try:
            return self._presets[name]
        except KeyError:
            raise InvalidRequest([f"Unknown ControlNet model {name!r}. Available: {', '.join(self.names) or 'none'}."]
                                 ) from None

    def only(self, names: list[str]) -> ControlNetCatalog:
        """A catalog of these (ZeroGPU: those that could be placed at start)."""
        return ControlNetCatalog([self.get(name) for name in names], dict(self.weights))

    def for_family(self, family: str) -> list[str]:
        """The names of the ControlNets made for a family (those the form offers for its presets)."""
        return [preset.name for preset in self if preset.family == family]

    def for_sketches(self, family: str) -> ControlNetPreset | None:
        """The ControlNet Sketch to image guides with by default for a family's presets, if it has one."""
        return next((preset for preset in self if preset.family == family and preset.for_sketches), None)


_FIELDS = set(ControlNetPreset.__dataclass_fields__) - {"name"}


def _preset_from_yaml(name: str, entry: dict[str, Any], base_dir: Path) -> ControlNetPreset:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"ControlNet {name!r}: unknown field(s) {sorted(unknown)}.")
    if sum(key in entry for key in ("repo", "local")) != 1:
        raise ValueError(f"ControlNet {name!r}: give exactly one of 'repo' (Hub id) or 'local' (folder).")
    if entry.get("family") not in FAMILIES:
        raise ValueError(f"ControlNet {name!r}: family must be one of {tuple(FAMILIES)}, not {entry.get('family')!r}.")
    if entry.get("kind", "controlnet") not in MODEL_CLASSES:
        raise ValueError(f"ControlNet {name!r}: kind must be one of {tuple(MODEL_CLASSES)}, not {entry['kind']!r}.")
    values = dict(entry)
    values["words"] = tuple(str(word).lower() for word in values.get("words") or ())
    if not isinstance(values.get("control_types") or {}, dict):
        raise ValueError(f"ControlNet {name!r}: control_types maps a preprocessor to its type: {{scribble: 2, ...}}.")
    values["control_types"] = tuple((str(name), int(index))
                                    for name, index in (values.get("control_types") or {}).items())
    if (values.get("kind") == UNION) != bool(values["control_types"]):
        raise ValueError(f"ControlNet {name!r}: a controlnet_union model needs control_types (preprocessor: type), "
                         "and only it has them.")
    if values.get("local") is not None:
        values["local"] = (base_dir / Path(values["local"]).expanduser()).resolve()
    return ControlNetPreset(name=name, **values)


def load_controlnets(path: Path = PRESETS_FILE) -> ControlNetCatalog:
    data = yaml.safe_load(Path(path).read_text()) or {}
    presets = [_preset_from_yaml(name, entry, Path(path).parent)
               for name, entry in (data.get("controlnets") or {}).items()]
    sketch_families = [preset.family for preset in presets if preset.for_sketches]
    doubled = sorted({family for family in sketch_families if sketch_families.count(family) > 1})
    if doubled:
        raise ValueError(f"{path}: more than one ControlNet with for_sketches for family {', '.join(doubled)}.")
    weights = {name: _weights_from_yaml(name, entry, Path(path).parent)
               for name, entry in (data.get("preprocessor_weights") or {}).items()}
    return ControlNetCatalog(presets, weights)


def _weights_from_yaml(name: str, entry: dict[str, Any], base_dir: Path) -> PreprocessorWeights:
    if set(entry) - {"repo", "local", "files"} or sum(key in entry for key in ("repo", "local")) != 1:
        raise ValueError(f"Preprocessor weights {name!r}: give 'files' and exactly one of 'repo' or 'local'.")
    local = (base_dir / Path(entry["local"]).expanduser()).resolve() if "local" in entry else None
    return PreprocessorWeights(name, tuple(entry.get("files") or ()), entry.get("repo"), local)


class ControlNetLoader:
    """The ModelManager's loader for kind "controlnet": `<class>.from_pretrained` from a folder or the Hub cache
    (files are fetched beforehand, outside the device lock); the key's variant (`config`) is read on GPUs, in
    float16, as the presets' variants are."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return safetensors_bytes(weight_files(self._folder(key.source), variant_of(key, dtype)), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> torch.nn.Module:
        import diffusers

        model_class = getattr(diffusers, MODEL_CLASSES[key.part])
        kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, local_files_only=not os.path.isdir(key.source))
        variant = variant_of(key, dtype)
        if variant:
            kwargs["variant"] = variant
        try:
            return model_class.from_pretrained(key.source, **kwargs).eval()
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise unavailable(key.source, error) from error

    @staticmethod
    def _folder(source: str) -> Path:
        return cached_folder(source)


def variant_of(key: ModelKey, dtype: torch.dtype) -> str | None:
    return key.config if key.config and dtype == torch.float16 else None


def controlnet_weights_file(preset: ControlNetPreset, dtype: torch.dtype) -> Path | None:
    """The weights file the loader reads for it (None when it is not here)."""
    try:
        files = weight_files(ControlNetLoader._folder(preset.source), preset.variant_for(dtype))
    except ModelUnavailable:
        return None
    return files[0] if len(files) == 1 else None


def check_controlnet_fits(preset: ControlNetPreset, model_family: str, model_label: str) -> str | None:
    """Why a ControlNet cannot serve a model of `model_family` (None when it can)."""
    if preset.family == model_family:
        return None
    made_for, family = family_named(preset.family), family_named(model_family)
    steered = model_label if family.label in model_label else f"{model_label} ({family.label})"
    return (f"ControlNet {preset.label!r} is made for {made_for.label} models and cannot steer {steered}: a "
            f"ControlNet adds to the blocks of the UNet it was trained with. Pick one made for {family.label}, or "
            "another preset.")


def soft_injection_scales(count: int, weight: float) -> list[float]:
    """A unit's scale for each of its `count` outputs (down blocks, then the middle block) under soft injection:
    A1111's 13-entry table, its first `count` entries (a ControlNet with more outputs continues the decay)."""
    top = max(count, SOFT_INJECTION_OUTPUTS) - 1
    return [weight * SOFT_INJECTION_BASE ** (top - index) for index in range(count)]


@dataclass
class ControlClock:
    """Which sampling step a pass is at, for the units' guidance ranges: the pipeline's step callback advances it
    once per model evaluation (twice a step for Heun, DPM2 and DPM++ SDE)."""

    steps: int  # the pass's sampling steps
    order: int = 1  # model evaluations per step
    evaluations: int = 0

    @property
    def step(self) -> int:
        return self.evaluations // self.order

    def advance(self) -> None:
        self.evaluations += 1

    def ticking(self, then):
        """A callback_on_step_end that advances the clock, then calls `then`."""
        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.advance()
            return then(pipe, step, timestep, callback_kwargs)

        return on_step_end


@dataclass(frozen=True)
class UnitSettings:
    """How one unit acts: its weight, the fraction of the pass's steps it starts and stops at, and its mode."""

    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = BALANCED
    control_type: int | None = None  # a Union model's type for the unit's map

    def acts_at(self, step: int, steps: int) -> bool:
        """As A1111: a unit acts at step i of n while start <= i / n <= end (and its weight is not 0)."""
        done = step / max(steps, 1)
        return self.weight != 0 and self.guidance_start <= done <= self.guidance_end


class AdapterNet(torch.nn.Module):
    """A T2I-Adapter as one of ControlUnits' nets. The pipeline prepares its map like a ControlNet's ([0, 1], the
    batch doubled under guidance) and reads `config.global_pool_conditions` of its first net; the adapter's
    features depend on the map alone, so they are computed once per pass (this wrapper is made per pass)."""

    def __init__(self, adapter: torch.nn.Module):
        super().__init__()
        self.adapter = adapter
        self.config = SimpleNamespace(global_pool_conditions=False)
        self._features: list[torch.Tensor] | None = None

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The adapter's features of the pipeline's map. Its pixel unshuffle needs sides that are multiples of its
        downscale factor (16 for SDXL's); the UNet's blocks round a side up instead (1000 px: 125 latents, 63 after
        the first block), so the map is padded below and to the right with black ("no control") to the next
        multiple (1008 px: 63), which lines the features up with the UNet's blocks at any size the studio takes."""
        if self._features is None:
            factor = self.adapter.downscale_factor
            height, width = image.shape[-2:]
            padded = torch.nn.functional.pad(image, (0, -width % factor, 0, -height % factor))
            self._features = list(self.adapter(padded.to(self.adapter.dtype)))
        return self._features


class ControlUnits(MultiControlNetModel):
    """A job's control units as diffusers' ControlNet pipelines call them (a MultiControlNetModel, which they
    accept), with each unit's range and mode applied here rather than by the pipeline: the pipeline is called
    with a full range and weight 1 per unit, and this module

    - leaves out a unit outside its range or at weight 0 (the UNet gets no residuals at all when none acts, so a
      unit at weight 0 gives the image without it, bit for bit);
    - scales a unit's outputs by its weight ("Balanced"), by A1111's soft-injection table times it ("My prompt is
      more important"), or adds them to the conditional half of the batch only, under classifier-free guidance
      ("ControlNet is more important": the negative prompt's pass sees no control, as A1111's cfg injection).

    ControlNets (plain or Union, which reads its map as the unit's control type) return the residuals the pipeline
    hands the UNet. T2I-Adapters' features go inside the UNet's down blocks, which the pipeline has no argument
    for: they wait in `intrablock` for the UNet's call, where `adapter_residuals` puts them.
    The nets are the manager's shared models: this wrapper is made per pass and holds nothing else."""

    def __init__(self, nets: list[torch.nn.Module], settings: list[UnitSettings], clock: ControlClock,
                 guidance: bool):
        super().__init__([AdapterNet(net) if is_adapter(net) else net for net in nets])
        self.settings = settings
        self.clock = clock
        self.guidance = guidance  # the batch is [negative, positive] halves
        self.intrablock: list[torch.Tensor] | None = None  # this evaluation's adapter features, for the UNet

    @property
    def has_adapters(self) -> bool:
        return any(isinstance(net, AdapterNet) for net in self.nets)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        residuals, intrablock = None, None
        for net, image, unit in zip(self.nets, controlnet_cond, self.settings):
            if not unit.acts_at(self.clock.step, self.clock.steps):
                continue
            if isinstance(net, AdapterNet):
                features = self._in_mode(net.features(image), unit, ADAPTER_SOFT_INJECTION)
                intrablock = add_up(intrablock, features)
                continue
            arguments = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=image, conditioning_scale=1.0, class_labels=class_labels,
                             timestep_cond=timestep_cond, attention_mask=attention_mask,
                             added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                             guess_mode=False, return_dict=False)
            if is_union(net):
                arguments |= union_arguments(net, image, unit.control_type, sample)
            unit_down, unit_middle = net(**arguments)
            outputs = [*unit_down, unit_middle]
            residuals = add_up(residuals, self._in_mode(outputs, unit, soft_injection_scales(len(outputs), 1.0)))
        self.intrablock = intrablock
        if residuals is None:
            return None, None
        return residuals[:-1], residuals[-1]

    def _in_mode(self, outputs: list[torch.Tensor], unit: UnitSettings, soft_table) -> list[torch.Tensor]:
        """A unit's outputs scaled for its control mode. A1111's (sd-webui-controlnet, hook.py): soft injection
        for both non-balanced modes; cfg injection, the negative prompt's half without control, for "ControlNet is
        more important" alone."""
        if unit.control_mode in (PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT):
            scales = [unit.weight * factor for factor in soft_table[:len(outputs)]]
        else:
            scales = [unit.weight] * len(outputs)
        outputs = [output * scale for output, scale in zip(outputs, scales)]
        if unit.control_mode == CONTROLNET_MORE_IMPORTANT and self.guidance:
            outputs = [torch.cat([torch.zeros_like(half), half]) for half in (output.chunk(2)[1] for output in outputs)]
        return outputs

    def add_intrablock_residuals(self, unet, args, kwargs):
        """The UNet's forward pre-hook (see adapter_residuals): this evaluation's adapter features, once."""
        if self.intrablock is not None:
            kwargs["down_intrablock_additional_residuals"] = list(self.intrablock)  # the UNet pops from it
            self.intrablock = None
        return args, kwargs


@contextmanager
def adapter_residuals(unet: torch.nn.Module, units: ControlUnits | None):
    """While a pass runs, the UNet's calls get the units' T2I-Adapter features (none without adapters). A call
    hook, not a change to the model: registered inside the stage's lease (the device lock held, the UNet this job's
    alone) and removed when the pass ends, even on an error, so the shared UNet the manager records is the same
    model after the pass as before it. Not a manager Patch: a patch outlives its lease (it stays across one job's
    turns, as a LoRA does), where this belongs to one pass's units and their maps."""
    if units is None or not units.has_adapters:
        yield
        return
    handle = unet.register_forward_pre_hook(units.add_intrablock_residuals, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def add_up(total: list[torch.Tensor] | None, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return outputs if total is None else [left + right for left, right in zip(total, outputs)]


def is_adapter(net: torch.nn.Module) -> bool:
    from diffusers import T2IAdapter

    return isinstance(net, T2IAdapter)


def is_union(net: torch.nn.Module) -> bool:
    from diffusers import ControlNetUnionModel

    return isinstance(net, ControlNetUnionModel)


def union_arguments(net: torch.nn.Module, image: torch.Tensor, control_type: int | None,
                    sample: torch.Tensor) -> dict[str, Any]:
    """A Union net's call for one map: the map as the one condition, and its control type as the one-hot vector
    diffusers' Union pipeline makes (a row per sample)."""
    if control_type is None or not 0 <= control_type < net.config.num_control_type:
        raise InvalidRequest([f"A Union ControlNet unit's control type {control_type} is not one of the model's "
                              f"{net.config.num_control_type} (presets/controlnets.yaml, control_types)."])
    one_hot = torch.zeros(sample.shape[0], net.config.num_control_type, device=sample.device, dtype=sample.dtype)
    one_hot[:, control_type] = 1
    return dict(controlnet_cond=[image], control_type=one_hot, control_type_idx=[control_type],
                conditioning_scale=[1.0])


@dataclass(frozen=True)
class PassControls:
    """What a denoising pass needs for its units: the manager's keys (one per unit, in order), each unit's control
    image at the pass's size, and its settings."""

    keys: tuple[ModelKey, ...]
    images: tuple[Any, ...]  # PIL images
    settings: tuple[UnitSettings, ...] = field(default=())

    def roles(self) -> dict[str, ModelKey]:
        return {control_role(index): key for index, key in enumerate(self.keys)}


def control_role(index: int) -> str:
    """A unit's ControlNet's role in a stage's lease."""
    return f"{CONTROLNET}:{index}"


def missing_controlnet_error(preset: ControlNetPreset) -> ModelUnavailable:
    return ModelUnavailable(f"ControlNet {preset.label!r} is not here: its folder {preset.source} does not exist. "
                            "For the embedded one: python -m studio.embedded train-controlnet.")

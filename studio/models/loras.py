"""LoRA add-ons: files in `loras/` or Hub files named in `presets/loras.yaml`, applied per request.

A LoRA is named in the prompt as A1111 does (`<lora:name:0.8>`; the UI's picker writes that tag). Its weights
are a model of kind "lora" in the shared ModelManager (counted against the budget like any other), converted
once from kohya/A1111 or diffusers/PEFT keys by diffusers' `lora_state_dict`. A stage that needs them leases
them with its own models, loads them as PEFT adapters into the text encoder(s) or the denoiser it holds (its
family says which components those are and how a file's keys convert), sets the
request's weights, runs, and removes them before the lease ends: the shared models never carry one visitor's
LoRA into another visitor's request.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from studio.a1111.prompts import LoraUse
from studio.core.downloads import DownloadRequest, HubDownloads, download_command
from studio.core.errors import InvalidRequest, ModelUnavailable, StudioError
from studio.core.model_records import ModelKey, Patch
from studio.models.families import FAMILIES, ModelFamily, family_of
from studio.models.weights import safetensors_bytes, safetensors_header

log = logging.getLogger("studio.models.loras")

LORA = "lora"  # the ModelManager kind
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LORA_FOLDER = ROOT / "loras"
DEFAULT_LORA_PRESETS = ROOT / "presets" / "loras.yaml"
VOCABULARY_METADATA = "studio.vocabulary"  # the words a LoRA teaches (JSON list), so they are not "unknown"
MAX_LORA_WEIGHT = 10.0

# The width of the text embeddings a UNet cross-attends to, per family: a LoRA's attn2.to_k reads it. (SD 3's and
# FLUX's transformers read T5's 4096 alike: their LoRAs are told apart by their blocks' names, see made_for.)
CONTEXT_WIDTHS = {family.context_width: family.short_label for family in FAMILIES.values() if not family.flow_matching}
ANY_TRANSFORMER = "transformer"  # a flow transformer's LoRA whose keys name only blocks SD 3 and FLUX both have
_FLUX_BLOCKS = ("double_blocks", "single_blocks", "single_transformer_blocks")  # BFL's, kohya's, XLabs', diffusers'
_SD3_BLOCKS = ("joint_blocks",)  # SD 3's own (kohya's) names
_CROSS_ATTENTION_KEY = re.compile(r"attn2[._]to_k.*(lora_down|lora_A|lora\.down)\.weight$")
# A text-encoder layer that reads the encoder's hidden states; its width is the embeddings' (SDXL: two encoders,
# side by side), for a LoRA without cross-attention layers
_TEXT_ENCODER_INPUT_KEY = re.compile(
    r"^(?P<encoder>text_encoder_2|text_encoder|lora_te2|lora_te1|lora_te)[._].*(q_proj|k_proj|v_proj|fc1)"
    r".*(lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$")


@dataclass(frozen=True)
class LoraPreset:
    """One LoRA the studio offers: a local .safetensors file, or a file in a Hub repo."""

    name: str  # what <lora:name> says
    file: str  # a local path, or the file's name in `repo`
    repo: str | None = None
    revision: str | None = None
    description: str = ""
    # what it was made for (made_for): a UNet's text-embedding width, a flow family's name; None: not known
    made_for: int | str | None = None

    def fits(self, model: int | str | None) -> bool:
        """Whether it fits a model made for `model` (model_made_for; True when either is unknown: the request's own
        check decides once the files are here)."""
        return fits(self.made_for, model)

    @property
    def label(self) -> str:
        return f"LoRA {self.name}"

    @property
    def download(self) -> DownloadRequest | None:
        return DownloadRequest(self.repo, (self.file,), self.label, self.revision) if self.repo else None


class LoraCatalog:
    """The LoRAs on offer: every .safetensors in the folder (named by its file name) and the presets file's
    entries. Immutable once built."""

    def __init__(self, presets: Mapping[str, LoraPreset]):
        self.presets = dict(presets)
        self._hashes: dict[tuple, str] = {}
        self._hash_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.presets)

    def __contains__(self, name: str) -> bool:
        return name in self.presets

    def get(self, name: str) -> LoraPreset:
        try:
            return self.presets[name]
        except KeyError:
            raise InvalidRequest([self.unknown(name)]) from None

    def unknown(self, name: str) -> str:
        available = ", ".join(self.names) or "none (put .safetensors files in loras/)"
        return f"Unknown LoRA {name!r} in <lora:{name}:…>. Available LoRAs: {available}."

    def only(self, names: list[str]) -> LoraCatalog:
        return LoraCatalog({name: self.presets[name] for name in names})

    def path(self, name: str, downloads: HubDownloads | None = None, on_progress=None) -> Path:
        """The LoRA's file on disk: a local file, or the Hub file fetched into the cache (ModelUnavailable
        offline, naming the LoRA)."""
        preset = self.get(name)
        if preset.repo is None:
            path = Path(preset.file).expanduser()
            if not path.is_file():
                raise ModelUnavailable(f"{preset.label}: the file {path} is missing.")
            return path
        downloads = downloads or HubDownloads()
        if downloads.is_offline() and not downloads.is_cached(preset.download):
            raise ModelUnavailable(
                f"{preset.label} is a file in the Hub repo {preset.repo}, not downloaded yet, and the Hub cannot be "
                f"reached: connect to the internet, or take <lora:{name}:…> out of the prompt.",
                command=download_command(preset.download, one_per_line=True))
        snapshot = downloads.ensure(preset.download, on_progress)
        return Path(snapshot) / preset.file

    def short_hash(self, path: Path) -> str:
        """A1111's LoRA hash (what Civitai matches): the first 12 hex digits of the sha256 of the tensors,
        without the safetensors header, so that editing metadata keeps the hash. Read once per file version."""
        stat = path.stat()
        stamp = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._hash_lock:
            known = self._hashes.get(stamp)
        if known is None:  # read outside the lock: one visitor's large file does not hold up another's small one
            known = addnet_hash(path)[:12]
            with self._hash_lock:
                self._hashes[stamp] = known
        return known


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file after its header (kohya's and A1111's 'addnet' hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_length)
        for block in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def load_loras(folder: str | Path | None = DEFAULT_LORA_FOLDER,
               presets_file: str | Path | None = DEFAULT_LORA_PRESETS) -> LoraCatalog:
    """The folder's .safetensors files first (they work offline), then the presets file's Hub entries (a local
    file wins a name clash)."""
    presets: dict[str, LoraPreset] = {}
    if folder and Path(folder).is_dir():
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                presets[path.stem] = LoraPreset(name=path.stem, file=str(path), description=header_description(path),
                                                made_for=made_for(path))
            except (StudioError, OSError) as error:  # a truncated file, a Git LFS pointer: the others stay
                log.warning("LoRA file %s left out: %s", path, str(error).splitlines()[0])
    if presets_file and Path(presets_file).is_file():
        entries = yaml.safe_load(Path(presets_file).read_text()) or {}
        for name, entry in (entries.get("loras") or {}).items():
            if not isinstance(entry, dict) or not entry.get("file"):
                raise ValueError(f"LoRA {name!r} in {presets_file}: give its `file` (and `repo` for a Hub file).")
            family = entry.get("family")
            if family is not None and family not in FAMILIES:
                raise ValueError(f"LoRA {name!r} in {presets_file}: family must be one of "
                                 f"{tuple(FAMILIES)}, not {family!r}.")
            presets.setdefault(str(name), LoraPreset(name=str(name), file=entry["file"], repo=entry.get("repo"),
                                                     revision=entry.get("revision"),
                                                     description=entry.get("description", ""),
                                                     made_for=family_target(FAMILIES[family]) if family else None))
    return LoraCatalog(presets)


def header_description(path: Path) -> str:
    """A local LoRA's own description, from its metadata (kohya's ss_* fields or ours)."""
    metadata = safetensors_metadata(path)
    return metadata.get("studio.description") or metadata.get("ss_output_name") or ""


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The file's own metadata (the header's __metadata__; {} when it has none or is not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as file:
            return dict(file.metadata() or {})
    except (OSError, SafetensorError):
        return {}


def vocabulary_of(path: Path) -> list[str]:
    """The words a LoRA says it teaches (our metadata field), for the unknown-words check."""
    try:
        words = json.loads(safetensors_metadata(path).get(VOCABULARY_METADATA, "[]"))
    except json.JSONDecodeError:
        return []
    return [str(word) for word in words] if isinstance(words, list) else []


def context_width(path: Path) -> int | None:
    """The text-embedding width the LoRA's cross-attention layers read, or else its text encoders' width (None when
    it has neither)."""
    header = {key: info for key, info in safetensors_header(path).items()
              if key != "__metadata__" and len(info.get("shape", [])) == 2}
    for key, info in header.items():
        if _CROSS_ATTENTION_KEY.search(key):
            return int(info["shape"][1])
    encoders: dict[str, int] = {}
    for key, info in header.items():
        match = _TEXT_ENCODER_INPUT_KEY.search(key)
        if match:
            encoders.setdefault(match["encoder"].replace("lora_te1", "lora_te"), int(info["shape"][1]))
    return sum(encoders.values()) or None


def made_for(path: Path) -> int | str | None:
    """What a LoRA file was made for: a flow family's name where its keys name FLUX's or SD 3's own blocks
    (ANY_TRANSFORMER where they name only blocks both have), else the text-embedding width its UNet layers read
    (context_width: SD 1.x 768, SD 2.x 1024, SDXL 2048), None when it says neither."""
    keys = [key for key in safetensors_header(path) if key != "__metadata__"]
    if any(block in key for key in keys for block in _FLUX_BLOCKS):
        return "flux"
    if any(block in key for key in keys for block in _SD3_BLOCKS):
        return "sd3"
    if any(key.startswith(("transformer.", "lora_transformer_")) for key in keys):
        return ANY_TRANSFORMER
    return context_width(path)


def family_target(family: ModelFamily) -> int | str:
    """What a family's LoRAs are made for (see made_for)."""
    return family.name if family.flow_matching else family.context_width


def model_made_for(models, preset) -> int | str:
    """What the preset's model takes LoRAs made for: its flow family's name, else the text-embedding width its UNet
    reads, from its config where that is here without a download (`models`: DiffusersModels), else its family's."""
    family = family_of(preset)
    return family_target(family) if family.flow_matching else (models.cross_attention_dim(preset)
                                                               or family.context_width)


def fits(lora: int | str | None, model: int | str | None) -> bool:
    if lora is None or model is None:
        return True
    if lora == ANY_TRANSFORMER:
        return isinstance(model, str)
    return lora == model


def made_for_label(target: int | str) -> str:
    if target == ANY_TRANSFORMER:
        return "an SD 3 or FLUX.1 transformer"
    if isinstance(target, str):
        return FAMILIES[target].short_label
    return CONTEXT_WIDTHS.get(target, f"a model with {target}-wide text embeddings")


def family_mismatch(name: str, lora: int | str | None, model: int | str | None, model_label: str) -> str | None:
    """A sentence when the LoRA was made for another family of models than the preset's."""
    if fits(lora, model):
        return None
    return (f"LoRA {name!r} was made for {made_for_label(lora)}; {model_label} is {made_for_label(model)}. "
            "Pick a LoRA made for this model's family, or another preset.")


def check_lora_uses(uses: tuple[LoraUse, ...], catalog: LoraCatalog, max_loras: int) -> list[str]:
    """Problems with a prompt's LoRAs that need no file: unknown names, too many, weights out of range."""
    problems = [catalog.unknown(use.name) for use in uses if use.name not in catalog]
    if len(uses) > max_loras:
        problems.append(f"The prompt names {len(uses)} LoRAs; at most {max_loras} can be applied at once here.")
    for use in uses:
        if max(abs(use.text_encoder_weight), abs(use.unet_weight)) > MAX_LORA_WEIGHT:
            problems.append(f"{use.tag}: LoRA weights must be between -{MAX_LORA_WEIGHT:g} and "
                            f"{MAX_LORA_WEIGHT:g} (1 is the LoRA as trained; 0.5-1 is usual).")
    return problems


# ----- the manager's side -----


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA as a request applies it: its weights' key in the manager, and the two weights."""

    name: str
    key: ModelKey
    text_encoder_weight: float
    denoiser_weight: float
    short_hash: str = ""
    text_encoder_layers: bool = True  # whether it has any: a stage leases only the LoRAs it applies
    denoiser_layers: bool = True


_TEXT_ENCODER_KEYS = ("lora_te", "text_encoder", "te_", "te1_", "te2_")


def layer_kinds(path: Path) -> tuple[bool, bool]:
    """(has text-encoder layers, has denoiser layers), from the key names in the file's header (kohya or
    diffusers)."""
    keys = [key for key in safetensors_header(path) if key != "__metadata__"]
    text_encoder = any(key.startswith(_TEXT_ENCODER_KEYS) for key in keys)
    denoiser = any(not key.startswith(_TEXT_ENCODER_KEYS) for key in keys)
    return text_encoder, denoiser


def lora_key(path: Path, family: ModelFamily) -> ModelKey:
    """The family's LoRA loader picks diffusers' key conversion (SDXL's kohya files name two encoders), so families
    that share one share the loaded weights. The file's size and time are part of the key: a LoRA file replaced
    on disk is a new model, not the cached old one."""
    stat = Path(path).stat()
    return ModelKey(LORA, str(Path(path).resolve()), f"{family.lora_loader}@{stat.st_size}-{stat.st_mtime_ns}")


def lora_loader_mixin(key: ModelKey) -> type:
    import diffusers.loaders

    return getattr(diffusers.loaders, key.part.split("@")[0])


class LoraWeights(torch.nn.Module):
    """A LoRA's tensors in diffusers' key names, held as buffers so that the manager can size and move them."""

    def __init__(self, state_dict: dict[str, torch.Tensor], network_alphas: dict[str, float] | None,
                 metadata: dict | None):
        super().__init__()
        self.keys = list(state_dict)
        for index, key in enumerate(self.keys):
            self.register_buffer(f"t{index}", state_dict[key])
        self.network_alphas = network_alphas
        self.metadata = metadata

    def tensors(self) -> dict[str, torch.Tensor]:
        """A fresh dict each time: diffusers pops the keys it uses."""
        return {key: getattr(self, f"t{index}") for index, key in enumerate(self.keys)}

    def has(self, prefix: str) -> bool:
        return any(key.startswith(f"{prefix}.") for key in self.keys)


class LoraLoader:
    """The ModelManager's loader for kind "lora"."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return safetensors_bytes([Path(key.source)], dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> LoraWeights:
        mixin = lora_loader_mixin(key)
        try:
            state_dict, alphas, metadata = read_lora(mixin, key.source)
        except (OSError, ValueError, KeyError) as error:
            raise ModelUnavailable(f"{Path(key.source).name} could not be read as a LoRA ({error}).") from error
        if not state_dict or not all("lora" in name for name in state_dict):
            raise ModelUnavailable(f"{Path(key.source).name} is not a LoRA file diffusers reads (kohya/A1111 or "
                                   "diffusers/PEFT safetensors).")
        if not any(name.startswith(CONVERTED_PREFIXES) for name in state_dict):  # e.g. SD 3's kohya layout
            raise ModelUnavailable(f"{Path(key.source).name}: diffusers does not convert this LoRA's layout "
                                   f"({next(iter(state_dict)).split('.')[0]}…) for these models; a LoRA saved in "
                                   "diffusers' layout (transformer.…) would load.")
        floating = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                    for name, tensor in state_dict.items()}
        return LoraWeights(floating, alphas, metadata)


CONVERTED_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")  # diffusers' names once converted


def read_lora(mixin: type, path: str) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers' names, network alphas, metadata) as the family's diffusers mixin converts the file
    (kohya/A1111, diffusers/PEFT; FLUX's XLabs and BFL too). The mixins answer in different shapes: SD's with
    alphas, FLUX's with them when asked, SD 3's without."""
    parameters = inspect.signature(mixin.lora_state_dict).parameters
    if "return_alphas" in parameters:
        return mixin.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    answer = mixin.lora_state_dict(path, return_lora_metadata=True)
    if len(answer) == 2:  # SD 3's: (state dict, metadata)
        return answer[0], None, answer[1]
    return answer


def lora_patch(component: str, family: ModelFamily, loras: tuple[AppliedLora, ...]) -> Patch:
    """The LoRAs on one component (the denoiser or a text encoder) at their weights, as a patch the manager applies
    and removes. As ComfyUI patches a model, they are merged into its weights: PEFT loads them as adapters, each
    adapted layer's weight and bias are kept (a copy in RAM), the adapters are merged and their layers go, so
    denoising costs what it costs without a LoRA; removing the patch puts the kept tensors back, bit for bit. A
    LoRA PEFT cannot merge (a bias where the layer has none) stays as adapter layers instead. Its identity is the
    LoRAs and their weights in the prompt's order: a model that carries it already (the same job's previous image)
    is left as it is."""
    is_denoiser = component == family.denoiser
    weights = tuple(lora.denoiser_weight if is_denoiser else lora.text_encoder_weight for lora in loras)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # adapted layer -> (weight, bias) before the merge
    merged = [True]  # False: the adapters stay as layers (PEFT could not merge them)

    def apply(model, lease: Mapping[str, Any]) -> None:
        files = [(lora, lease[lora_role(lora)]) for lora in loras]
        try:
            if is_denoiser:
                names, chosen = _load_into_denoiser(model, component, family.denoiser_label, files)
            else:
                names, chosen = _load_into_text_encoder(model, component, files)
            if names:
                _activate(model, is_denoiser, names, chosen)
                merged[0] = _merge(model, names, kept)
                if not merged[0]:
                    restore_kept(model)  # what merged before PEFT refused: the adapters do it all
            if merged[0]:
                _remove_adapters(model, is_denoiser)  # the merged weights stay; the adapter layers go
        except BaseException:  # a LoRA that failed half way: the model as it was
            _remove_adapters(model, is_denoiser)
            restore_kept(model)
            raise

    def restore_kept(model) -> None:
        for path, (weight, bias) in kept.items():
            layer = model.get_submodule(path)
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            layer.weight.data.copy_(weight)
            if bias is not None:
                layer.bias.data.copy_(bias)
        kept.clear()

    def remove(model) -> None:
        if merged[0]:
            restore_kept(model)
        else:
            _remove_adapters(model, is_denoiser)

    def held() -> int:  # the kept copies, on the manager's books while the patch is on
        return sum(tensor.numel() * tensor.element_size() for pair in kept.values() for tensor in pair
                   if tensor is not None)

    def held_bound(model, lease: Mapping[str, Any]) -> int:  # before applying: room is made for this first
        # diffusers' converted keys start with the component's name ("unet.", "text_encoder.")
        return adapted_layer_bytes([lease[lora_role(lora)] for lora in loras], component, model)

    return Patch(identity=("lora", component, tuple(lora.key for lora in loras), weights), apply=apply,
                 remove=remove, held=held, held_bound=held_bound)


def adapted_layer_bytes(files: list[LoraWeights], prefix: str, model) -> int:
    """At most the bytes of the layers these LoRAs change in `model` (their weight and a bias), from the LoRAs'
    own shapes: a layer's down (A) matrix gives its inputs (times the kernel), its up (B) matrix its outputs."""
    dtype_bytes = next(iter(model.parameters())).element_size()
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for lora_weights in files:
        for key, tensor in lora_weights.tensors().items():
            if not key.startswith(f"{prefix}.") or ".lora" not in key:
                continue
            layer, _, rest = key.partition(".lora")
            side = "down" if ("down" in rest or "_A" in rest) else "up" if ("up" in rest or "_B" in rest) else None
            if side and rest.endswith("weight"):
                layers.setdefault(layer, {})[side] = tensor
    total = 0
    for pair in layers.values():
        if "down" in pair and "up" in pair:
            outputs, inputs = pair["up"].shape[0], math.prod(pair["down"].shape[1:])
            total += (outputs * inputs + outputs) * dtype_bytes
    return total


def _merge(model, names: list[str], kept: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """Every adapted layer's weight and bias kept in RAM, then the active adapters merged into them (PEFT's merge, at
    the weights set); False where PEFT cannot merge them. A layer's path is where its base layer will be once the
    adapter layers are removed."""
    from peft.tuners.lora import LoraLayer

    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, LoraLayer)]
    for path, layer in layers:
        base = layer.get_base_layer()
        bias = base.bias.detach().to("cpu", copy=True) if getattr(base, "bias", None) is not None else None
        kept[path] = (base.weight.detach().to("cpu", copy=True), bias)
    try:
        for _path, layer in layers:
            layer.merge(adapter_names=[name for name in names if name in layer.lora_A])
    except (RuntimeError, ValueError) as error:
        log.info("LoRA adapters kept as layers, not merged: %s", _first_line(error))
        for _path, layer in layers:
            layer.merged_adapters.clear()  # the kept tensors go back; PEFT must not unmerge them again
        return False
    return True


def lora_role(lora: AppliedLora) -> str:
    """The role a LoRA's weights have in a stage's lease."""
    return f"{LORA}:{lora.name}"


def adapter_name(index: int) -> str:
    """By position in the prompt: two LoRA names never become one adapter name."""
    return f"studio_lora_{index}"


def _load_into_denoiser(denoiser, prefix: str, label: str, loras) -> tuple[list[str], list[float]]:
    """`prefix`: the denoiser's component name, which diffusers' converted LoRA keys start with ("unet");
    `label`: its name for people ("UNet")."""
    names, weights = [], []
    for index, (lora, lora_weights) in enumerate(loras):
        if not lora_weights.has(prefix):
            continue
        refuse_if_stored_in_float8(denoiser, lora.name, label)
        name = adapter_name(index)
        try:
            denoiser.load_lora_adapter(lora_weights.tensors(), prefix=prefix, network_alphas=lora_weights.network_alphas,
                                       adapter_name=name, metadata=lora_weights.metadata)
        except (ValueError, RuntimeError, KeyError) as error:
            raise InvalidRequest([f"LoRA {lora.name!r} does not fit this model's {label} ({_first_line(error)}). "
                                  "It was probably made for another family of models."]) from error
        if name not in getattr(denoiser, "peft_config", {}):
            raise InvalidRequest([f"LoRA {lora.name!r} has no layers this model's {label} has: it was made for "
                                  "another family of models."])
        names.append(name)
        weights.append(lora.denoiser_weight)
    return names, weights


def refuse_if_stored_in_float8(model, lora_name: str, label: str) -> None:
    """A model the manager stores in float8 to fit a small GPU takes no LoRA: PEFT neither merges into float8 weights
    nor computes its adapters in them."""
    if any(parameter.dtype in FLOAT8_DTYPES for parameter in model.parameters()):
        raise InvalidRequest([f"LoRA {lora_name!r} cannot be applied here: this model's {label} is stored in float8 to "
                              "fit this GPU, and a LoRA needs its weights in 16 bits. Take the <lora:…> tag out, or "
                              "use a GPU with more memory."])


FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _load_into_text_encoder(encoder, prefix: str, loras) -> tuple[list[str], list[float]]:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    names, weights = [], []
    for index, (lora, lora_weights) in enumerate(loras):
        if not lora_weights.has(prefix):
            continue
        refuse_if_stored_in_float8(encoder, lora.name, "text encoder")
        name = adapter_name(index)
        try:
            StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                lora_weights.tensors(), lora_weights.network_alphas, encoder, prefix=prefix, adapter_name=name,
                metadata=lora_weights.metadata)
        except (ValueError, RuntimeError, KeyError) as error:
            raise InvalidRequest([f"LoRA {lora.name!r} does not fit this model's text encoder "
                                  f"({_first_line(error)})."]) from error
        names.append(name)
        weights.append(lora.text_encoder_weight)
    return names, weights


def _activate(model, is_denoiser: bool, names: list[str], weights: list[float]) -> None:
    if is_denoiser:  # a diffusers model
        model.set_adapters(names, weights)
    else:  # a transformers text encoder
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(model, names, weights)


def _remove_adapters(model, is_denoiser: bool) -> None:
    """Every PEFT layer out of the model: it is the same module objects as before the lease. Safe on a model
    that got none (a LoRA that failed to load)."""
    if not getattr(model, "peft_config", None) and not any("lora" in name for name, _ in model.named_modules()):
        return
    if is_denoiser:
        model.unload_lora()
    else:
        # what diffusers' unload_lora_weights does for a transformers text encoder
        from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

        _remove_text_encoder_monkey_patch(model)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


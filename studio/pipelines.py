"""Stable Diffusion with diffusers, in stages that each hold only what they use on the device.

- `DiffusersLoader` loads one component (UNet, VAE, text encoder ...) of a diffusers repo or folder, or a
  standalone model from another source (Realistic Vision's ft-MSE VAE, SDXL's fp16-fix VAE, the safety checker).
- `DiffusersModels` knows which components a (preset, task) is made of, as ModelKeys the manager shares.
- `DiffusionStages` runs one image as stages: encode (text encoders on the device), denoise (UNet, and the VAE
  for an init image), decode (VAE), check (safety checker). Between stages the device lock is free, so other
  jobs take turns; a stage that runs out of memory is retried with VAE tiling, then with idle models off the
  device, then (on CUDA) with accelerate's model CPU offload, and only then reported.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from .devices import format_bytes, release_memory
from .downloads import DownloadRequest, diffusers_patterns, hub_offline_by_env, human_size, one_line
from .errors import InvalidRequest, ModelUnavailable, OutOfMemoryBudget
from .memory import ModelKey, ModelManager, text_encoder_working_memory, unet_working_memory, vae_decode_working_memory
from .loras import LORA, AppliedLora, LoraLoader, adapters_applied
from .prompts import encode_sd, encode_sdxl

TASKS = ("text2img", "img2img", "inpaint")
KIND = "diffusers"
CHECKPOINT_KIND = "checkpoint"  # a component of a single-file (A1111-style) checkpoint
HUB_CHECK_TTL_S = 60
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
VAE_TILE = 512  # pixels: the tile a tiled VAE decodes at a time (SD's native size)

_PIPELINE_CLASSES = {
    ("sd", "text2img"): StableDiffusionPipeline,
    ("sd", "img2img"): StableDiffusionImg2ImgPipeline,
    ("sd", "inpaint"): StableDiffusionInpaintPipeline,
    ("sdxl", "text2img"): StableDiffusionXLPipeline,
    ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline,
}
_ROLES = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
SAFETY_ROLES = ("safety_checker", "feature_extractor")
WEIGHTLESS = ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor")
# The class of a component given alone, without a model_index.json to say it (a VAE or checker from another repo).
STANDALONE_CLASSES = {
    "vae": ("diffusers", "AutoencoderKL"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "safety_checker": ("diffusers.pipelines.stable_diffusion.safety_checker", "StableDiffusionSafetyChecker"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
}
STAGE_ROLES = {
    "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "denoise": ("unet", "scheduler"),  # + the VAE where an init image is encoded (img2img, inpaint)
    "decode": ("vae",),
    "check": SAFETY_ROLES,
}
EXECUTION_ORDER = ("text_encoder", "text_encoder_2", "vae", "unet", "safety_checker")
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_VARIANT_MARKS = (".fp16.", ".bf16.", ".fp32.", ".ema.", ".non_ema.")


def architecture(preset) -> str:
    return "sdxl" if preset.family == "sdxl" else "sd"


def standalone_key(role: str, source: str) -> ModelKey:
    """A component whose files sit at the root of `source` (a repo or folder of its own)."""
    return ModelKey(KIND, source, f"{role}@root")


def component_key(source: str, role: str, config_source: str) -> ModelKey:
    """A pipeline component of a diffusers repo or folder, or of a single-file checkpoint: there the weights come
    from the file and the rest (tokenizer, scheduler) from the configs' repo or folder."""
    if not is_checkpoint_file(source):
        return ModelKey(KIND, source, role)
    if role in WEIGHTLESS:
        return ModelKey(KIND, config_source, role)
    return ModelKey(CHECKPOINT_KIND, source, role, config=config_source)


def is_checkpoint_file(source: str) -> bool:
    return source.lower().endswith(".safetensors")


FAMILY_NAMES = {"sd15": "Stable Diffusion 1.x", "sd21": "Stable Diffusion 2.x", "sdxl": "SDXL"}


def config_location(key: ModelKey) -> tuple[str, str | None]:
    """(source, subfolder) of a component's config.json: a checkpoint's component is described by its configs'
    repo or folder."""
    if key.kind == CHECKPOINT_KIND:
        return key.config, key.part
    return key.source, _split_part(key.part)[1]


def _split_part(part: str) -> tuple[str, str | None]:
    """(role, subfolder) of a key's part: 'unet' -> ('unet', 'unet'); 'vae@root' -> ('vae', None)."""
    role, _, where = part.partition("@")
    return role, None if where == "root" else role


class HubAccess:
    """Whether the Hub answers, asked at most once a minute. Without it, huggingface_hub retries a dead
    connection five times with back-off (~30 s) before falling back to the cache."""

    def __init__(self):
        self._lock = threading.Lock()
        self._checked: tuple[bool, float] | None = None

    def offline(self) -> bool:
        if hub_offline_by_env():
            return True
        with self._lock:
            if self._checked and time.monotonic() - self._checked[1] < HUB_CHECK_TTL_S:
                return not self._checked[0]
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=3).close()
            online = True
        except OSError:
            online = False
        with self._lock:
            self._checked = (online, time.monotonic())
        return not online


class DiffusersLoader:
    """Loads diffusers and transformers components with `<Class>.from_pretrained(source, subfolder=...)`, the
    call `DiffusionPipeline.from_pretrained` makes, one component at a time, from a folder or the Hub cache.
    Files are fetched beforehand, outside the device lock (see studio.downloads); here only the cache is read."""

    def __init__(self, variant_for: Callable[[str, torch.dtype], str | None] = lambda source, dtype: None):
        self.variant_for = variant_for  # (source, dtype) -> file variant ("fp16") to load, from the presets
        self._model_index: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        role, subfolder = _split_part(key.part)
        if role in WEIGHTLESS:
            return 0
        folder = self._folder(key.source, subfolder)
        return safetensors_bytes(weight_files(folder, self.variant_for(key.source, dtype)), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        role, subfolder = _split_part(key.part)
        try:
            library, class_name = self.component_class(key.source, role, subfolder)
            component_class = getattr(importlib.import_module(library), class_name)
            kwargs: dict[str, Any] = {"local_files_only": not os.path.isdir(key.source)}
            if subfolder:
                kwargs["subfolder"] = subfolder
            if role not in WEIGHTLESS:
                kwargs.update(dtype=dtype, use_safetensors=True)
                variant = self.variant_for(key.source, dtype)
                if variant:
                    kwargs["variant"] = variant
            return component_class.from_pretrained(key.source, **kwargs)
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise unavailable(key.source, error) from error

    def _folder(self, source: str, subfolder: str | None) -> Path:
        """The local folder of a component: in the source folder, or in the Hub cache's snapshot."""
        if os.path.isdir(source):
            return Path(source) / (subfolder or "")
        from huggingface_hub import snapshot_download

        try:
            pattern = f"{subfolder}/*" if subfolder else "*"
            snapshot = snapshot_download(source, allow_patterns=[pattern], local_files_only=True)
        except Exception as error:  # noqa: BLE001
            raise unavailable(source, error) from error
        return Path(snapshot) / (subfolder or "")

    def component_class(self, source: str, role: str, subfolder: str | None) -> tuple[str, str]:
        """(library, class name) of a component, from the repo's model_index.json."""
        if subfolder is None:
            return STANDALONE_CLASSES[role]
        with self._lock:
            index = self._model_index.get(source)
        if index is None:
            index = DiffusionPipeline.load_config(source, local_files_only=not os.path.isdir(source))
            with self._lock:
                self._model_index[source] = index
        entry = index.get(subfolder)
        if not entry or entry[0] is None:
            raise ModelUnavailable(f"{source} has no {subfolder!r} component.")
        library, class_name = entry
        if library not in ("diffusers", "transformers"):
            library = f"diffusers.pipelines.{library}"  # e.g. the safety checker lives in "stable_diffusion"
        return library, class_name


# Where each component's tensors sit in an original-layout checkpoint (SD 1.x/2.x, and SDXL's conditioner).
CHECKPOINT_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


class CheckpointLoader:
    """Loads one component of a single-file checkpoint (an A1111 / civitai .safetensors) with diffusers'
    single-file conversion, the call `from_single_file` makes per component; its config comes from the key's
    configs repo or folder (fetched beforehand, like any Hub file). A 9-channel UNet (an inpainting checkpoint)
    gets in_channels from the file, so one base config describes both."""

    def __init__(self):
        self._configs = DiffusersLoader()  # reads (and caches) the configs' model_index.json

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        if not os.path.isfile(key.source):
            raise ModelUnavailable(f"The checkpoint file {key.source} does not exist.")
        return safetensors_bytes([Path(key.source)], dtype, prefixes=CHECKPOINT_PREFIXES[key.part])

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        from diffusers import pipelines
        from diffusers.loaders.single_file import load_single_file_sub_model
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        role = key.part
        try:
            library, class_name = self._configs.component_class(key.config, role, role)
            checkpoint = with_text_model_level(load_single_file_checkpoint(key.source, local_files_only=True))
            return load_single_file_sub_model(
                library, class_name, role, checkpoint, pipelines, is_pipeline_module=False,
                cached_model_config_path=key.config, local_files_only=not os.path.isdir(key.config),
                torch_dtype=dtype, **(unet_overrides(checkpoint) if role == "unet" else {}))
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise ModelUnavailable(f"The {role} of the checkpoint {key.source} could not be loaded with the configs "
                                   f"of {key.config}: is it a {role} of that kind of model? ({type(error).__name__}: "
                                   f"{one_line(error)})") from error


# Early SD 1.x files store the text encoder without transformers' `text_model.` level; A1111 renames these
# (its checkpoint_dict_replacements_sd1), and so does the studio, since diffusers does not recognise them.
OLD_SD1_TEXT_ENCODER = tuple(f"cond_stage_model.transformer.{part}." for part in ("embeddings", "encoder",
                                                                                  "final_layer_norm"))


def with_text_model_level(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "cond_stage_model.transformer."
    return {f"{prefix}text_model.{name[len(prefix):]}" if name.startswith(OLD_SD1_TEXT_ENCODER) else name: tensor
            for name, tensor in checkpoint.items()}


def unet_overrides(checkpoint: dict[str, torch.Tensor]) -> dict[str, int]:
    """What the file says that the base's config does not: an inpainting UNet takes 9 input channels (latents,
    mask, masked image), so one base config describes both kinds of checkpoint."""
    return {"in_channels": checkpoint[UNET_CONV_IN].shape[1]} if UNET_CONV_IN in checkpoint else {}


def diffusers_loaders(variant_for: Callable[[str, torch.dtype], str | None] = lambda source, dtype: None) -> dict:
    """The manager's loaders for Stable Diffusion components: from diffusers repos and folders, and from
    single-file checkpoints, and LoRA add-ons."""
    return {KIND: DiffusersLoader(variant_for), CHECKPOINT_KIND: CheckpointLoader(), LORA: LoraLoader()}


def root_weight_patterns(variant: str | None) -> list[str]:
    """config.json and the weights of a model saved at a repo's root, by the libraries' own file names only
    (a '*' in a Hub pattern also matches '/', and would fetch every subfolder's weights too)."""
    suffix = f".{variant}" if variant else ""
    patterns = ["config.json"]
    for stem in ("diffusion_pytorch_model", "model"):
        patterns += [f"{stem}{suffix}.safetensors", f"{stem}{suffix}-*-of-*.safetensors",
                     f"{stem}.safetensors.index{suffix}.json"]
    return patterns


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files from_pretrained loads from `folder`: the variant's if asked, else the plain ones.
    Where the library's own file names are there, only those (a repo may also hold a single-file checkpoint,
    e.g. sdxl-vae-fp16-fix's sdxl.vae.safetensors, which from_pretrained does not read)."""
    files = sorted(folder.glob("*.safetensors"))
    canonical = [f for f in files if f.name.startswith(("diffusion_pytorch_model", "model"))]
    files = canonical or files
    if variant:
        chosen = [f for f in files if f".{variant}." in f.name]
        if chosen:
            return chosen
    return [f for f in files if not any(mark in f.name for mark in _VARIANT_MARKS)]


UNSAVED_BUFFERS_SLACK = 64 * 1024  # buffers a model makes but does not save (e.g. CLIP's position ids)


def safetensors_bytes(files: list[Path], dtype: torch.dtype, prefixes: tuple[str, ...] = ("",)) -> int:
    """Bytes the tensors in these files (those named with one of `prefixes`) take once loaded with floating
    tensors cast to `dtype`, read from the files' headers alone (a few KB each), so room can be made before
    anything is loaded; plus a little for buffers that are made, not loaded, so that the estimate is never short."""
    target = torch.finfo(dtype).bits // 8
    total = UNSAVED_BUFFERS_SLACK if files else 0
    for path in files:
        for name, info in safetensors_header(path).items():
            if not name.startswith(prefixes):
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count * (target if info["dtype"] in _FLOAT_DTYPES else _OTHER_DTYPES.get(info["dtype"], 4))
    return total


def safetensors_header(path: Path | str) -> dict[str, Any]:
    """The tensor table at the start of a .safetensors file (8 bytes of length, then JSON)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        start = file.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
        try:
            if not 0 < length <= size - 8:
                raise ValueError("no header")
            header = json.loads(file.read(length))
            if not isinstance(header, dict):
                raise ValueError("no tensor table")
            tensors = {name: info for name, info in header.items() if name != "__metadata__"}
            expected = 8 + length + max((info["data_offsets"][1] for info in tensors.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ModelUnavailable(f"{path} is not a .safetensors file ({size:,} bytes): an incomplete download, "
                                   "or a git-lfs pointer? Fetch it again.") from None
    if size < expected:
        raise ModelUnavailable(f"{path} is cut off: {size:,} of its {expected:,} bytes are there (an interrupted "
                               "download or copy?). Fetch it again.")
    return tensors


def checkpoint_family(header: dict[str, Any]) -> str | None:
    """Which family an original-layout checkpoint is, from its tensor names (None when they do not say)."""
    if any(name.startswith("conditioner.embedders.1.") for name in header):
        return "sdxl"
    if any(name.startswith("cond_stage_model.model.") for name in header):
        return "sd21"  # OpenCLIP text encoder
    if any(name.startswith("cond_stage_model.transformer.") for name in header):
        return "sd15"
    return None


def unavailable(source: str, error: Exception) -> ModelUnavailable:
    """A model that is in neither its folder nor the Hub cache when it is loaded (downloads have their own)."""
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if os.path.isdir(source) or source.startswith(("/", ".")):
        where = f"from the folder {source}"
        advice = "Check the folder (for the embedded model: python -m studio.embedded train)."
    else:
        where = f"from the Hugging Face Hub ({source}) and they are not in the local cache"
        advice = "Connect to the internet or pre-download the model, or choose the embedded preset."
    return ModelUnavailable(f"Model {source} is unavailable: its weights could not be fetched {where}. {advice} "
                            f"({type(error).__name__}: {reason})")


class DiffusersModels:
    """Which components a (preset, task) is made of, and pipelines assembled over them."""

    def __init__(self, device: torch.device, safety_checker_everywhere: bool = False,
                 safety_checker_source: str = SAFETY_CHECKER_REPO):
        self.device = torch.device(device)
        # Public mode: every preset gets a safety checker (its own, or CompVis's), unless it is safe by construction.
        self.safety_checker_everywhere = safety_checker_everywhere
        self.safety_checker_source = safety_checker_source
        self._hashes: dict[tuple, str] = {}  # (real path, size, mtime) -> short sha256
        self._scale_factors: dict[ModelKey, int] = {}
        self._lock = threading.Lock()

    def keys(self, preset, task: str) -> dict[str, ModelKey]:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        keys = {role: component_key(preset.source, role, preset.config_source) for role in _ROLES[architecture(preset)]}
        if task == "inpaint" and preset.inpaint_source:
            # A dedicated 9-channel inpainting UNet; text encoders, VAE and tokenizers stay the base's.
            keys["unet"] = component_key(preset.inpaint_source, "unet", preset.config_source)
        for role, source in preset.components.items():  # e.g. a VAE from another repo
            keys[role] = standalone_key(role, source)
        if self.needs_safety_checker(preset):
            if preset.safety_checker:
                keys.update({role: ModelKey(KIND, preset.config_source, role) for role in SAFETY_ROLES})
            else:
                keys.update({role: standalone_key(role, self.safety_checker_source) for role in SAFETY_ROLES})
        return keys

    def needs_safety_checker(self, preset) -> bool:
        return preset.safety_checker or (self.safety_checker_everywhere and not preset.safe_by_construction)

    def stage_keys(self, preset, task: str, stage: str) -> dict[str, ModelKey]:
        keys = self.keys(preset, task)
        roles = STAGE_ROLES[stage] + (("vae",) if stage == "denoise" and task != "text2img" else ())
        return {role: key for role, key in keys.items() if role in roles}

    def vae_scale_factor(self, preset, task: str) -> int:
        """How much the VAE downsamples, read from its config: a pipeline without its VAE (text-to-image
        denoising) would otherwise assume 8, and the embedded model's VAE downsamples by 4."""
        key = self.keys(preset, task)["vae"]
        with self._lock:
            if key in self._scale_factors:
                return self._scale_factors[key]
        source, subfolder = config_location(key)
        config = AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=not os.path.isdir(source))
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        with self._lock:
            self._scale_factors[key] = factor
        return factor

    def download_requests(self, preset, task: str, dtype: torch.dtype) -> list[DownloadRequest]:
        """What to fetch from the Hub for (preset, task), one request per source (folders need nothing)."""
        subfolders: dict[str, list[str]] = {}
        standalone: dict[str, list[str]] = {}
        configs_only: dict[str, list[str]] = {}
        checkpoint_files: dict[str, list[str]] = {}  # configs source -> the files whose weights it describes
        for key in self.keys(preset, task).values():
            if key.kind == CHECKPOINT_KIND:  # the weights are in the file: only the component's config is fetched
                config_source, subfolder = config_location(key)
                configs_only.setdefault(config_source, []).append(subfolder)
                checkpoint_files.setdefault(config_source, []).append(Path(key.source).name)
                continue
            role, subfolder = _split_part(key.part)
            (subfolders if subfolder else standalone).setdefault(key.source, []).append(subfolder or role)
        variant = self.variant_for([preset])
        requests = []
        for source in dict.fromkeys([*subfolders, *standalone, *configs_only]):
            if os.path.isdir(source):
                continue
            patterns = list(diffusers_patterns(subfolders[source], variant(source, dtype))) if source in subfolders else []
            for role in standalone.get(source, []):  # a model of its own: its files sit at the repo's root
                patterns += ["preprocessor_config.json"] if role in WEIGHTLESS else root_weight_patterns(
                    variant(source, dtype))
            label = f"Preset {preset.label!r}"
            if source in configs_only:  # a checkpoint's configs: the weights are in its file(s)
                patterns += ["model_index.json", *(f"{subfolder}/config.json" for subfolder in configs_only[source])]
                weighted = [name for name in subfolders.get(source, []) if name not in WEIGHTLESS]
                if not weighted and source not in standalone:
                    files = ", ".join(dict.fromkeys(checkpoint_files[source]))
                    label = (f"Preset {preset.label!r} (its configs: tokenizer, scheduler, config.json; the weights "
                             f"are in {files})")
            requests.append(DownloadRequest(source, tuple(dict.fromkeys(patterns)), label=label))
        return requests

    def variant_for(self, presets) -> Callable[[str, torch.dtype], str | None]:
        """(source, dtype) -> the file variant to load: a preset's `variant` applies on GPUs (fp16); some
        inpainting repos ship fp16 files only, so their variant applies everywhere."""
        def variant(source: str, dtype: torch.dtype) -> str | None:
            for preset in presets:
                if source == preset.inpaint_source and preset.inpaint_variant:
                    return preset.inpaint_variant
                if source == preset.source and dtype == torch.float16:
                    return preset.variant
            return None

        return variant

    def assemble(self, preset, task: str, parts: dict[str, Any]):
        """A pipeline over the given components; those a stage does not use are None, so that the pipeline
        object never keeps a model alive that the manager has let go."""
        pipeline_class = _PIPELINE_CLASSES[(architecture(preset), task)]
        roles = _ROLES[architecture(preset)]
        arguments = {role: parts.get(role) for role in roles}
        if arguments["scheduler"] is not None:
            # A private scheduler copy: schedulers keep per-call state (step index), pipelines share the rest.
            arguments["scheduler"] = type(arguments["scheduler"]).from_config(arguments["scheduler"].config)
        if architecture(preset) == "sd":
            arguments.update(safety_checker=parts.get("safety_checker"), feature_extractor=parts.get("feature_extractor"),
                             requires_safety_checker=False)
        else:
            arguments["add_watermarker"] = False
        pipeline = pipeline_class(**arguments)
        if arguments["vae"] is None and arguments["unet"] is not None:
            pipeline.vae_scale_factor = self.vae_scale_factor(preset, task)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    # ----- model hash for PNG metadata (A1111's "Model hash": sha256 of the weights, first 10 hex) -----

    def model_hash(self, preset, task: str = "text2img",
                   on_progress: Callable[[int, int, str], None] | None = None) -> str | None:
        """The hash of the weights this task really runs (a dedicated inpainting checkpoint's own, as A1111 does):
        for a single-file checkpoint the file's, A1111's own short hash; for a diffusers repo or folder its UNet
        file's. Where the file must be read for it (once per file), `on_progress(bytes read, size, text)` follows."""
        source = preset.inpaint_source if task == "inpaint" and preset.inpaint_source else preset.source
        path = source if is_checkpoint_file(source) else self._unet_weights_path(preset, source)
        if path is None or not os.path.isfile(path):
            return None
        status = os.stat(path)
        identity = (os.path.realpath(path), status.st_size, status.st_mtime_ns)  # a file replaced in place is new
        with self._lock:
            if identity in self._hashes:
                return self._hashes[identity]
        # In the Hub cache, an LFS blob's file name is its sha256: no need to read gigabytes.
        name = os.path.basename(identity[0])
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            digest = name
        else:
            digest = _sha256(path, on_progress)
        with self._lock:
            self._hashes[identity] = digest[:10]
        return digest[:10]

    def check_checkpoint_files(self, preset, task: str) -> None:
        """A preset's single-file checkpoints, checked before anything is fetched or loaded: there, readable, and
        of the preset's family. Raises ModelUnavailable naming the preset, the field and the file."""
        fields = [("checkpoint", preset.checkpoint)]
        if task == "inpaint":
            fields.append(("inpaint_checkpoint", preset.inpaint_checkpoint))
        for field_name, path in fields:
            if path is None:
                continue
            if not path.is_file():
                raise ModelUnavailable(f"Preset {preset.label!r}: its {field_name} file {path} does not exist. Check "
                                       "the path in the presets file (a relative path is relative to that file).")
            try:
                found = checkpoint_family(safetensors_header(path))
            except OSError as error:  # e.g. no permission to read it
                raise ModelUnavailable(f"Preset {preset.label!r}: its {field_name} file {path} cannot be read "
                                       f"({one_line(error)}).") from None
            except ModelUnavailable as error:
                raise ModelUnavailable(f"Preset {preset.label!r}: {error}") from None
            if found is not None and found != preset.family:
                raise ModelUnavailable(f"Preset {preset.label!r}: {path.name} looks like a {FAMILY_NAMES[found]} "
                                       f"checkpoint, but the preset says family {preset.family} "
                                       f"({FAMILY_NAMES[preset.family]}). Set `family: {found}`.")

    def text_encoder_layers(self, preset) -> int | None:
        """How many layers the preset's (first) text encoder has, from its config file where it can be read
        without a download (a local folder, or the Hub cache); None otherwise."""
        found = file_without_download(*config_location(self.keys(preset, "text2img")["text_encoder"]), "config.json")
        return json.loads(Path(found).read_text()).get("num_hidden_layers") if found else None

    def cross_attention_dim(self, preset, task: str = "text2img") -> int | None:
        """The width of the text embeddings the preset's UNet reads (which LoRAs fit it), from its config file
        where it can be read without a download; None otherwise."""
        found = file_without_download(*config_location(self.keys(preset, task)["unet"]), "config.json")
        return json.loads(Path(found).read_text()).get("cross_attention_dim") if found else None

    def _unet_weights_path(self, preset, source: str) -> str | None:
        variant = preset.inpaint_variant if source == preset.inpaint_source else preset.variant
        # a local folder has the plain file; on the Hub the variant is what is fetched (always for inpainting repos
        # that ship only fp16)
        use_variant = variant and not os.path.isdir(source) and (self.device.type != "cpu"
                                                                  or source == preset.inpaint_source)
        filename = f"diffusion_pytorch_model.{variant}.safetensors" if use_variant else "diffusion_pytorch_model.safetensors"
        return file_without_download(source, "unet", filename)


def file_without_download(source: str, subfolder: str | None, filename: str) -> str | None:
    """The local path of a model file, in a folder or in the Hub cache; None when it would need a download."""
    if os.path.isdir(source):
        path = Path(source) / (subfolder or "") / filename
        return str(path) if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    # huggingface_hub 1.x takes the file's path in the repo (it has no `subfolder` here)
    found = try_to_load_from_cache(source, f"{subfolder}/{filename}" if subfolder else filename)
    return found if isinstance(found, str) else None


def _sha256(path: str, on_progress: Callable[[int, int, str], None] | None = None) -> str:
    digest, size, done = hashlib.sha256(), os.path.getsize(path), 0
    name = os.path.basename(path)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, size, f"Reading {name} for its hash (once per file): {human_size(done)} of "
                                        f"{human_size(size)}")
    return digest.hexdigest()


# ----- stages -----


@dataclass
class Conditioning:
    """The prompt's embeddings, made once per job by the encode stage and reused for every image."""

    embeds: dict[str, torch.Tensor]  # keyword arguments for the pipeline call: prompt_embeds, negative_prompt_embeds ...


@dataclass(frozen=True)
class StagePlan:
    """What a stage holds on the device: its models and the working memory reserved for its activations."""

    stage: str
    keys: dict[str, ModelKey]
    working_memory: int
    vae_tiling: bool = False


class DiffusionStages:
    """One image as stages on models leased per stage from the shared ModelManager."""

    def __init__(self, manager: ModelManager, models: DiffusersModels):
        self.manager = manager
        self.models = models

    # ----- plans: what each stage holds (the device planner in bench/ runs these same plans) -----

    def plan_encode(self, preset, task: str, guidance: bool, loras: tuple[AppliedLora, ...] = ()) -> StagePlan:
        loras = tuple(lora for lora in loras if lora.text_encoder_layers)  # only those with layers to apply here
        return StagePlan("encode", self.models.stage_keys(preset, task, "encode") | self._lora_keys(loras),
                         text_encoder_working_memory(2 if guidance else 1, self.manager.dtype)
                         + self._lora_bytes(loras))

    def plan_denoise(self, preset, task: str, width: int, height: int, guidance: bool, tiled: bool = False,
                     loras: tuple[AppliedLora, ...] = ()) -> StagePlan:
        loras = tuple(lora for lora in loras if lora.unet_layers)
        working = unet_working_memory(width, height, 1, self.manager.dtype, guidance)
        if task != "text2img":  # the VAE encodes the init image first (its activations are gone before the UNet runs)
            working = max(working, self._vae_working_memory(preset, width, height, tiled))
        return StagePlan("denoise", self.models.stage_keys(preset, task, "denoise") | self._lora_keys(loras),
                         working + self._lora_bytes(loras), vae_tiling=tiled)

    @staticmethod
    def _lora_keys(loras: tuple[AppliedLora, ...]) -> dict[str, ModelKey]:
        return {f"{LORA}:{lora.name}": lora.key for lora in loras}

    def _lora_bytes(self, loras: tuple[AppliedLora, ...]) -> int:
        """The LoRAs' weights once more: PEFT copies them into the adapter layers it adds for the stage."""
        return sum(self.manager.loaders[LORA].size(lora.key, self.manager.dtype) for lora in loras)

    def plan_decode(self, preset, task: str, width: int, height: int, tiled: bool = False) -> StagePlan:
        keys = self.models.stage_keys(preset, task, "decode")
        working = self._vae_working_memory(preset, width, height, tiled)
        if self._vae_upcast(preset):  # its weights double while they are in fp32
            working += self.manager.loaders[keys["vae"].kind].size(keys["vae"], self.manager.dtype)
        return StagePlan("decode", keys, working, vae_tiling=tiled)

    def plan_check(self, preset, task: str) -> StagePlan | None:
        keys = self.models.stage_keys(preset, task, "check")
        return StagePlan("check", keys, 256 * 1024**2) if keys else None

    def _vae_upcast(self, preset) -> bool:
        """SDXL's own VAE overflows in fp16 and decodes in fp32 (the fp16-fix VAE a preset may name does not)."""
        return architecture(preset) == "sdxl" and "vae" not in preset.components and self.manager.dtype == torch.float16

    def _vae_working_memory(self, preset, width: int, height: int, tiled: bool) -> int:
        dtype = torch.float32 if self._vae_upcast(preset) else self.manager.dtype
        if tiled:
            width, height = min(width, VAE_TILE), min(height, VAE_TILE)
        return vae_decode_working_memory(width, height, 1, dtype)

    # ----- running -----

    def encode(self, preset, task: str, prompt: str, negative_prompt: str, guidance_scale: float,
               clip_skip: int = 1, loras: tuple[AppliedLora, ...] = ()) -> tuple[Conditioning, list[str]]:
        """The embeddings of prompts in A1111's syntax (weights, BREAK; extra-network tags already taken out),
        of any length: encoded window by window and concatenated. `clip_skip` is A1111's (2 = the text
        encoder's second-to-last layer; SD 1.x only). The LoRAs' text-encoder layers apply for this stage."""
        guidance = guidance_scale > 1

        def work(models, plan):
            models, lora_weights = split_loras(models, tuple(lora for lora in loras if lora.text_encoder_layers))
            pipe = self.models.assemble(preset, task, models)
            device = self.manager.device
            with adapters_applied(lora_weights, models, architecture(preset)), torch.inference_mode():
                if architecture(preset) == "sdxl":
                    embeds = encode_sdxl(pipe, prompt, negative_prompt or "", guidance, device)
                else:
                    layers = pipe.text_encoder.config.num_hidden_layers
                    if clip_skip > layers:  # the check before the queue could not read the config
                        raise InvalidRequest([clip_skip_too_large(clip_skip, layers)])
                    embeds = encode_sd(pipe, prompt, negative_prompt or "", guidance, clip_skip, device)
            return Conditioning(embeds), []

        return self.run_stage(lambda tiled: self.plan_encode(preset, task, guidance, loras), work)

    def denoise(self, preset, task: str, width: int, height: int, guidance: bool,
                call: Callable[[Any], torch.Tensor], loras: tuple[AppliedLora, ...] = ()) -> torch.Tensor:
        """`call(pipe)` runs the pipeline with output_type="latent" and returns the latents. The LoRAs' UNet
        layers apply for this stage."""
        def work(models, plan):
            models, lora_weights = split_loras(models, tuple(lora for lora in loras if lora.unet_layers))
            pipe = self.models.assemble(preset, task, models)
            with vae_tiling(models.get("vae"), plan.vae_tiling), \
                    adapters_applied(lora_weights, {"unet": models["unet"]}, architecture(preset)):
                return call(pipe)

        return self.run_stage(
            lambda tiled: self.plan_denoise(preset, task, width, height, guidance, tiled, loras), work,
            can_tile=task != "text2img")

    def decode(self, preset, task: str, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents -> image tensor in [-1, 1] on the CPU."""
        def work(models, plan):
            vae = models["vae"]
            with vae_tiling(vae, plan.vae_tiling), torch.inference_mode():
                upcast = self._vae_upcast(preset) and vae.config.force_upcast
                if upcast:
                    vae.to(dtype=torch.float32)
                try:
                    # the manager's device, not the VAE's: under model CPU offload the VAE waits in RAM until
                    # decode's forward hook moves it
                    dtype = next(iter(vae.post_quant_conv.parameters())).dtype
                    scaled = unscale_latents(vae, latents.to(self.manager.device, dtype))
                    return vae.decode(scaled, return_dict=False)[0].float().cpu()
                finally:
                    if upcast:
                        vae.to(dtype=torch.float16)

        return self.run_stage(lambda tiled: self.plan_decode(preset, task, width, height, tiled), work, can_tile=True)

    def check(self, preset, task: str, images: torch.Tensor) -> list[bool]:
        """Which images the safety checker flags (none when the preset has no checker). It runs on its own, as
        SD's pipelines run it, so that it works for every architecture (SDXL's pipelines have no checker)."""
        def work(models, plan):
            pil = VaeImageProcessor().postprocess(images, output_type="pil")
            clip_input = models["feature_extractor"](pil, return_tensors="pt").pixel_values
            with torch.inference_mode():
                _, flagged = models["safety_checker"](
                    images=images.to(self.manager.device),
                    clip_input=clip_input.to(self.manager.device, self.manager.dtype),
                )
            return [bool(flag) for flag in flagged]

        plan = self.plan_check(preset, task)
        if plan is None:
            return [False] * len(images)
        return self.run_stage(lambda tiled: plan, work)

    def run_stage(self, plan_for: Callable[[bool], StagePlan], work: Callable[[dict, StagePlan], Any],
                  can_tile: bool = False) -> Any:
        """Run `work(models, plan)` holding the plan's models on the device. Out of memory (our budget or the
        device's own): VAE tiling first, then idle models off the device, then accelerate's model CPU offload
        (CUDA only), then a clear message."""
        plan = plan_for(False)
        attempts = ["as planned"] + (["with VAE tiling"] if can_tile else []) + ["with idle models off the device"]
        if self.manager.device.type == "cuda":
            attempts.append("with model CPU offload")
        failure = ""
        for attempt in attempts:
            if attempt == "with VAE tiling":
                plan = plan_for(True)
            if attempt == "with idle models off the device":
                self.manager.offload_idle()
            try:
                if attempt == "with model CPU offload":
                    return self._run_offloaded(plan, work)
                with self.manager.use(plan.keys, plan.working_memory) as models:
                    return work(models, plan)
            except (torch.OutOfMemoryError, OutOfMemoryBudget) as error:
                failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            # Outside the except block: the failed attempt's traceback, and the activations its frames hold, are
            # gone by now, so this really gives their memory back before the next attempt.
            release_memory(self.manager.device)
        raise OutOfMemoryBudget(
            f"Out of memory on {self.manager.device} in the {plan.stage} stage, even {attempts[-1]} "
            f"(it needs about {format_bytes(plan.working_memory)} of working memory besides the weights). "
            f"Try a smaller size or batch, or a smaller preset. ({failure})"
        )

    def _run_offloaded(self, plan: StagePlan, work):
        """accelerate's model CPU offload: the models stay in RAM and each is moved to the device only while
        its forward runs (the manager reserves room for the largest)."""
        from accelerate import cpu_offload_with_hook

        with self.manager.use(plan.keys, plan.working_memory, on_device=False) as models:
            hooks = []
            # chained in the order they run (the VAE encodes an init image before the UNet denoises), so each
            # model's hook sends the previous one back to RAM: one model on the device at a time
            for role in sorted(models, key=lambda role: EXECUTION_ORDER.index(role) if role in EXECUTION_ORDER else 99):
                model = models[role]
                if isinstance(model, torch.nn.Module):
                    _, hook = cpu_offload_with_hook(model, self.manager.device,
                                                    prev_module_hook=hooks[-1] if hooks else None)
                    hooks.append(hook)
            try:
                return work(models, plan)
            finally:
                for hook in hooks:
                    hook.offload()  # back to RAM, where the manager has them recorded
                    hook.remove()


def split_loras(models: dict[str, Any], loras: tuple[AppliedLora, ...]) -> tuple[dict[str, Any], list]:
    """A stage's lease: its pipeline components, and (LoRA, weights) pairs in the prompt's order."""
    components = {role: model for role, model in models.items() if not role.startswith(f"{LORA}:")}
    return components, [(lora, models[f"{LORA}:{lora.name}"]) for lora in loras]


def clip_skip_too_large(clip_skip: int, layers: int) -> str:
    return (f"Clip skip {clip_skip} is more than this model's text encoder has layers ({layers}): use at most "
            f"{layers}.")


@dataclass
class _Tiling:
    vae: Any
    on: bool

    def __enter__(self):
        if self.on and self.vae is not None:
            self._saved = (self.vae.tile_sample_min_size, self.vae.tile_latent_min_size)
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.vae.tile_sample_min_size = min(self.vae.tile_sample_min_size, VAE_TILE)
            self.vae.tile_latent_min_size = self.vae.tile_sample_min_size // factor
            self.vae.enable_tiling()

    def __exit__(self, *exc):
        if self.on and self.vae is not None:
            self.vae.disable_tiling()
            self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = self._saved


def vae_tiling(vae, on: bool) -> _Tiling:
    """Tiled VAE encode/decode for one stage; the VAE is shared, so it is switched back off afterwards."""
    return _Tiling(vae, on)


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the VAE decodes them (SDXL's optional latents mean/std included), as the pipelines do."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor

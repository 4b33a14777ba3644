"""Loading model components: one component of a diffusers repo or folder, or of a single-file (A1111-style)
checkpoint, as the manager's loaders for kinds "diffusers" and "checkpoint". Files are fetched beforehand, outside
the device lock (studio.core.downloads); here only local folders and the Hub cache are read."""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import DiffusionPipeline

from studio.core.downloads import hub_offline_by_env, one_line
from studio.core.errors import ModelUnavailable
from studio.core.model_records import ModelKey
from studio.models.families import (
    FAMILIES,
    checkpoint_family,
    checkpoint_prefixes,
    standalone_classes,
    weightless_components,
)
from studio.models.loras import LORA, LoraLoader
from studio.models.weights import safetensors_bytes, weight_files

KIND = "diffusers"
CHECKPOINT_KIND = "checkpoint"  # a component of a single-file (A1111-style) checkpoint
HUB_CHECK_TTL_S = 60
SAFETY_ROLES = ("safety_checker", "feature_extractor")
WEIGHTLESS = (*weightless_components(), "feature_extractor")
# The class of a component given alone, without a model_index.json to say it (a VAE or checker from another repo).
STANDALONE_CLASSES = {
    **standalone_classes(),
    "safety_checker": ("diffusers.pipelines.stable_diffusion.safety_checker", "StableDiffusionSafetyChecker"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
}


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


def config_location(key: ModelKey) -> tuple[str, str | None]:
    """(source, subfolder) of a component's config.json: a checkpoint's component is described by its configs'
    repo or folder."""
    if key.kind == CHECKPOINT_KIND:
        return key.config, key.part
    return key.source, split_part(key.part)[1]


def split_part(part: str) -> tuple[str, str | None]:
    """(role, subfolder) of a key's part: 'vae' -> ('vae', 'vae'); 'vae@root' -> ('vae', None)."""
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
    Files are fetched beforehand, outside the device lock (see studio.core.downloads); here only the cache is read."""

    def __init__(self, variant_for: Callable[[str, torch.dtype], str | None] = lambda source, dtype: None):
        self.variant_for = variant_for  # (source, dtype) -> file variant ("fp16") to load, from the presets
        self._model_index: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        role, subfolder = split_part(key.part)
        if role in WEIGHTLESS:
            return 0
        folder = self._folder(key.source, subfolder)
        return safetensors_bytes(weight_files(folder, self.variant_for(key.source, dtype)), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        role, subfolder = split_part(key.part)
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


class CheckpointLoader:
    """Loads one component of a single-file checkpoint (an A1111 / civitai .safetensors) with diffusers'
    single-file conversion, the call `from_single_file` makes per component; its config comes from the key's
    configs repo or folder (fetched beforehand, like any Hub file). The file's family (from its tensor names) says
    what its configs cannot: an inpainting UNet's 9 input channels, old tensor names."""

    def __init__(self):
        self._configs = DiffusersLoader()  # reads (and caches) the configs' model_index.json

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        if not os.path.isfile(key.source):
            raise ModelUnavailable(f"The checkpoint file {key.source} does not exist.")
        return safetensors_bytes([Path(key.source)], dtype, prefixes=checkpoint_prefixes(key.part))

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        from diffusers import pipelines
        from diffusers.loaders.single_file import load_single_file_sub_model
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        role = key.part
        try:
            library, class_name = self._configs.component_class(key.config, role, role)
            checkpoint = load_single_file_checkpoint(key.source, local_files_only=True)
            family = checkpoint_family(checkpoint) or FAMILIES["sd15"]  # files too old to say are SD 1.x
            checkpoint = family.checkpoint_tensors(checkpoint)
            return load_single_file_sub_model(
                library, class_name, role, checkpoint, pipelines, is_pipeline_module=False,
                cached_model_config_path=key.config, local_files_only=not os.path.isdir(key.config),
                torch_dtype=dtype, **family.checkpoint_overrides(role, checkpoint))
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise ModelUnavailable(f"The {role} of the checkpoint {key.source} could not be loaded with the configs "
                                   f"of {key.config}: is it a {role} of that kind of model? ({type(error).__name__}: "
                                   f"{one_line(error)})") from error


def diffusers_loaders(variant_for: Callable[[str, torch.dtype], str | None] = lambda source, dtype: None) -> dict:
    """The manager's loaders for Stable Diffusion components: from diffusers repos and folders, and from
    single-file checkpoints, and LoRA add-ons."""
    return {KIND: DiffusersLoader(variant_for), CHECKPOINT_KIND: CheckpointLoader(), LORA: LoraLoader()}


def cached_folder(source: str, allow_patterns: list[str] | None = None) -> Path:
    """The folder a model's files are in: `source` itself, or its snapshot in the Hub cache (fetched beforehand,
    outside the device lock; never downloaded here). Raises ModelUnavailable."""
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True, allow_patterns=allow_patterns))
    except Exception as error:  # noqa: BLE001
        raise unavailable(source, error) from error


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



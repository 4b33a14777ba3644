"""Loading Stable Diffusion components with diffusers and assembling pipelines over shared components."""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from .errors import ModelUnavailable
from .memory import ComponentKey

TASKS = ("text2img", "img2img", "inpaint")
HUB_CHECK_TTL_S = 60

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
_SAFETY_ROLES = ("safety_checker", "feature_extractor")
_WEIGHTLESS = ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor")


def architecture(preset) -> str:
    return "sdxl" if preset.family == "sdxl" else "sd"


class DiffusersFactory:
    """Knows how presets map to diffusers components; the ModelManager decides where they live.

    Components are loaded one by one with `<Class>.from_pretrained(source, subfolder=...)`, the same call
    `DiffusionPipeline.from_pretrained` makes, so a UNet can be dropped and reloaded alone.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._model_index: dict[str, dict[str, Any]] = {}
        self._hashes: dict[str, str] = {}
        self._hub_check: tuple[bool, float] | None = None
        self._lock = threading.Lock()

    # ----- what a pipeline is made of -----

    def component_keys(self, preset, task: str) -> dict[str, ComponentKey]:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        roles = _ROLES[architecture(preset)] + (_SAFETY_ROLES if preset.safety_checker else ())
        keys = {role: (preset.source, role) for role in roles}
        if task == "inpaint" and preset.inpaint_source:
            # A dedicated 9-channel inpainting UNet; text encoders, VAE and tokenizers stay the base's.
            keys["unet"] = (preset.inpaint_source, "unet")
        return keys

    def assemble(self, preset, task: str, components: dict[str, Any]):
        pipeline_class = _PIPELINE_CLASSES[(architecture(preset), task)]
        parts = dict(components)
        # A private scheduler copy: schedulers keep per-call state (step index), pipelines share the rest.
        parts["scheduler"] = type(parts["scheduler"]).from_config(parts["scheduler"].config)
        if architecture(preset) == "sd":
            parts.setdefault("safety_checker", None)
            parts.setdefault("feature_extractor", None)
            parts["requires_safety_checker"] = preset.safety_checker
        pipeline = pipeline_class(**parts)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    # ----- loading -----

    def load_component(self, preset, key: ComponentKey, dtype: torch.dtype):
        source, role = key
        try:
            library, class_name = self._component_class(preset, source, role)
            component_class = getattr(importlib.import_module(library), class_name)
            kwargs: dict[str, Any] = {"subfolder": role, "local_files_only": self._offline(preset)}
            if role not in _WEIGHTLESS:
                kwargs.update(dtype=dtype, use_safetensors=True)
                variant = self._variant(preset, source, dtype)
                if variant:
                    kwargs["variant"] = variant
            return component_class.from_pretrained(source, **kwargs)
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear message
            raise self._unavailable(preset, source, error) from error

    def _component_class(self, preset, source: str, role: str) -> tuple[str, str]:
        with self._lock:
            index = self._model_index.get(source)
        if index is None:
            index = DiffusionPipeline.load_config(source, local_files_only=self._offline(preset))
            with self._lock:
                self._model_index[source] = index
        entry = index.get(role)
        if not entry or entry[0] is None:
            raise ModelUnavailable(f"Preset {preset.label!r}: {source} has no {role!r} component.")
        library, class_name = entry
        if library not in ("diffusers", "transformers"):
            library = f"diffusers.pipelines.{library}"  # e.g. the safety checker lives in "stable_diffusion"
        return library, class_name

    def _offline(self, preset) -> bool:
        """Load a Hub preset from the local cache only when the Hub is unreachable.

        Without this, huggingface_hub retries a dead connection five times with back-off (~30 s) while the
        device lock is held and every other user waits.
        """
        if preset.is_local:
            return False
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return True
        with self._lock:
            if self._hub_check and time.monotonic() - self._hub_check[1] < HUB_CHECK_TTL_S:
                return not self._hub_check[0]
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=3).close()
            online = True
        except OSError:
            online = False
        with self._lock:
            self._hub_check = (online, time.monotonic())
        return not online

    def _variant(self, preset, source: str, dtype: torch.dtype) -> str | None:
        if source == preset.inpaint_source and preset.inpaint_variant:
            return preset.inpaint_variant  # some inpainting repos ship fp16 safetensors only
        return preset.variant if dtype == torch.float16 else None

    @staticmethod
    def _unavailable(preset, source: str, error: Exception) -> ModelUnavailable:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        if preset.is_local or os.path.isdir(source):
            where = f"from the folder {source}"
            advice = "Check the folder (for the embedded model: python -m studio.embedded train)."
        else:
            where = f"from the Hugging Face Hub ({source}) and they are not in the local cache"
            advice = "Connect to the internet or pre-download the model, or choose the embedded preset."
        return ModelUnavailable(
            f"Preset {preset.label!r} is unavailable: its weights could not be fetched {where}. {advice} "
            f"({type(error).__name__}: {reason})"
        )

    # ----- model hash for PNG metadata (A1111's "Model hash": sha256 of the weights, first 10 hex) -----

    def model_hash(self, preset) -> str | None:
        source = preset.source
        with self._lock:
            if source in self._hashes:
                return self._hashes[source]
        path = self._unet_weights_path(preset)
        if path is None:
            return None
        # In the Hub cache, an LFS blob's file name is its sha256: no need to read gigabytes.
        name = os.path.basename(os.path.realpath(path))
        digest = name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else _sha256(path)
        with self._lock:
            self._hashes[source] = digest[:10]
        return digest[:10]

    def _unet_weights_path(self, preset) -> str | None:
        filename = "diffusion_pytorch_model.safetensors"
        if preset.is_local:
            path = Path(preset.source) / "unet" / filename
            return str(path) if path.exists() else None
        from huggingface_hub import try_to_load_from_cache

        variant = preset.variant if self.device.type != "cpu" else None
        if variant:
            filename = f"diffusion_pytorch_model.{variant}.safetensors"
        found = try_to_load_from_cache(preset.source, filename, subfolder="unet")
        return found if isinstance(found, str) else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

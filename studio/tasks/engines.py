"""The one factory of the engine objects: the memory manager and what runs on it (text to image, inpaint, upscale),
for the app (app.py), `python -m studio.evaluation`, the tests and the benches.

It is built in two steps so that a server can place models between them (ZeroGPU loads every offered preset,
LoRA and upscaler before the engines are made, and offers only those that loaded):

    manager, models = build_manager(presets, ManagerSettings(device="cuda", device_budget=8 * GiB))
    engines = build_engines(manager, models, presets)

`local_engines(presets)` does both with a fresh manager on the CPU, with no server around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio import __version__
from studio.core.devices import default_dtype
from studio.core.downloads import HubDownloads
from studio.core.memory import ModelManager
from studio.core.model_records import ModelLoader
from studio.models.components import DiffusersModels
from studio.models.controlnets import CONTROLNET, ControlNetCatalog, ControlNetLoader, load_controlnets
from studio.models.faces import FaceRestoration
from studio.models.loading import diffusers_loaders
from studio.models.loras import LoraCatalog, load_loras
from studio.models.presets import PresetCatalog, StyleCatalog, load_styles
from studio.models.preview_decoders import PREVIEW_DECODER, PreviewDecoderLoader
from studio.models.stages import DiffusionStages
from studio.models.upscalers import UPSCALER, ReleaseFiles, UpscalerCatalog, UpscalerLoader, load_upscalers
from studio.tasks.generation import TextToImage
from studio.tasks.inpainting import Inpainter
from studio.tasks.requests import RequestLimits
from studio.tasks.upscaling import UpscaleLimits, Upscaling

VERSION = f"Diffusion Studio {__version__}"
DEFAULT_UPSCALER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion-studio" / "upscalers"


@dataclass(frozen=True)
class ManagerSettings:
    """Where models run and how much they may hold."""

    device: torch.device | str = "cpu"
    device_budget: int = 2 * 1024**3
    dtype: torch.dtype | None = None  # None: the device's (fp16 on CUDA, fp32 on the CPU)
    ram_budget: int | None = None  # the second tier (idle models kept in RAM); None: no second tier on the CPU
    free_memory: Callable[[], int | None] | None = None  # what the device has free now (CUDA's mem_get_info)
    public: bool = False  # every preset gets a safety checker unless it is safe by construction
    extra_loaders: Mapping[str, ModelLoader] = field(default_factory=dict)  # other kinds: CLIP, face restorers ...


@dataclass
class Engines:
    """The engine objects of one server (or test, or bench), all on one manager."""

    manager: ModelManager
    models: DiffusersModels
    stages: DiffusionStages
    text_to_image: TextToImage
    inpainter: Inpainter
    upscaling: Upscaling


def build_manager(presets: PresetCatalog, settings: ManagerSettings = ManagerSettings()) -> tuple[ModelManager, DiffusersModels]:
    """The memory manager with a loader for every kind of model the engines use, and the presets' components."""
    device = torch.device(settings.device)
    models = DiffusersModels(device, safety_checker_everywhere=settings.public)
    loaders = {**diffusers_loaders(models.variant_for(presets)), UPSCALER: UpscalerLoader(),
               CONTROLNET: ControlNetLoader(), PREVIEW_DECODER: PreviewDecoderLoader(), **settings.extra_loaders}
    manager = ModelManager(loaders, device, settings.dtype or default_dtype(device), device_budget=settings.device_budget,
                           ram_budget=settings.ram_budget, free_memory=settings.free_memory,
                           dtype_for=models.dtype_for(presets))
    return manager, models


def build_engines(manager: ModelManager, models: DiffusersModels, presets: PresetCatalog, *,
                  limits: RequestLimits | None = None, upscale_limits: UpscaleLimits | None = None,
                  styles: StyleCatalog | None = None, loras: LoraCatalog | None = None,
                  upscalers: UpscalerCatalog | None = None, release_files: ReleaseFiles | None = None,
                  faces: FaceRestoration | None = None, downloads: HubDownloads | None = None,
                  controlnets: ControlNetCatalog | None = None, version: str = VERSION) -> Engines:
    """Text to image (its Hires. fix upscales with the Upscale tab's upscalers), inpaint and upscale on one
    manager. What is not given is the default: the presets files, `loras/`, the upscaler cache."""
    limits = limits or RequestLimits()
    loras = load_loras() if loras is None else loras
    controlnets = load_controlnets() if controlnets is None else controlnets
    release_files = release_files or ReleaseFiles(DEFAULT_UPSCALER_CACHE)
    upscaling = Upscaling(manager, load_upscalers() if upscalers is None else upscalers, release_files,
                          upscale_limits or UpscaleLimits(), faces=faces)
    stages = DiffusionStages(manager, models)
    common: dict[str, Any] = dict(version=version, downloads=downloads, loras=loras, controlnets=controlnets)
    text_to_image = TextToImage(stages, presets, styles or load_styles(), limits, upscaling=upscaling, **common)
    inpainter = Inpainter(stages, presets, limits, **common)
    return Engines(manager=manager, models=models, stages=stages, text_to_image=text_to_image, inpainter=inpainter,
                   upscaling=upscaling)


def local_engines(presets: PresetCatalog, device: str = "cpu", device_budget: int = 2 * 1024**3,
                  dtype: torch.dtype = torch.float32, **engine_options) -> Engines:
    """The engines over one fresh manager, with no server around them (tests, benches, evaluations)."""
    manager, models = build_manager(presets, ManagerSettings(device=device, device_budget=device_budget, dtype=dtype))
    return build_engines(manager, models, presets, **engine_options)

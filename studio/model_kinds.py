"""Loaders for the kinds of model besides diffusers components, each registered with the one ModelManager:
an upscaler network (basicsr's RRDBNet, Real-ESRGAN's architecture) and a CLIP scorer (transformers' CLIPModel).
Like every loader they tell the model's size from its files' headers before loading, so the manager makes room
first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .basicsr_compat import rrdbnet_class
from .errors import ModelUnavailable
from .memory import ModelKey
from .pipelines import safetensors_bytes, unavailable, weight_files

UPSCALER = "upscaler"
CLIP = "clip"


def upscaler_key(folder: str | Path) -> ModelKey:
    return ModelKey(UPSCALER, str(folder))


def clip_key(source: str | Path) -> ModelKey:
    return ModelKey(CLIP, str(source))


class UpscalerLoader:
    """An RRDBNet from a folder holding config.json (its architecture's arguments) and one safetensors file."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return safetensors_bytes(self._weights(key), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        folder = Path(key.source)
        try:
            config = json.loads((folder / "config.json").read_text())
            architecture = config.pop("arch", "RRDBNet")
            if architecture != "RRDBNet":
                raise ModelUnavailable(f"{folder}: architecture {architecture!r} is not one this studio runs.")
            model = rrdbnet_class()(**config)
            model.load_state_dict(load_file(self._weights(key)[0]))
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - one clear message for any broken folder
            raise unavailable(key.source, error) from error
        return model.to(dtype).eval().requires_grad_(False)

    @staticmethod
    def _weights(key: ModelKey) -> list[Path]:
        files = weight_files(Path(key.source), None)
        if len(files) != 1:
            raise ModelUnavailable(f"Upscaler folder {key.source} must hold exactly one .safetensors file "
                                   f"(found {len(files)}).")
        return files


class ClipLoader:
    """A CLIP model (image and text towers) for scoring how well an image matches its prompt."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        folder = Path(key.source)
        if not folder.is_dir():
            raise unavailable(key.source, FileNotFoundError(f"{folder} is not a folder"))
        return safetensors_bytes(weight_files(folder, None), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        from transformers import CLIPModel

        try:
            return CLIPModel.from_pretrained(key.source, dtype=dtype, use_safetensors=True).eval()
        except Exception as error:  # noqa: BLE001
            raise unavailable(key.source, error) from error

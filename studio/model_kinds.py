"""Loaders for the kinds of model besides diffusers components, each registered with the one ModelManager: a CLIP
scorer (transformers' CLIPModel) here; the upscaler networks' loader is in upscalers.py.
Like every loader they tell the model's size from its files' headers before loading, so the manager makes room
first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .memory import ModelKey
from .pipelines import safetensors_bytes, unavailable, weight_files

CLIP = "clip"


def clip_key(source: str | Path) -> ModelKey:
    return ModelKey(CLIP, str(source))


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

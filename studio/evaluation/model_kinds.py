"""Loaders for the kinds of model besides diffusers components, each registered with the one ModelManager: a CLIP
scorer (transformers' CLIPModel) here; the upscaler networks' loader is in upscalers.py.
Like every loader they tell the model's size from its files' headers before loading, so the manager makes room
first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.core.model_records import ModelKey
from studio.models.loading import unavailable
from studio.models.weights import safetensors_bytes, weight_files

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


INCEPTION = "inception"
# FID's InceptionV3 weights (TensorFlow's, converted by torch-fidelity), under the name torch.hub keeps them
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS


def inception_key(weights: str | Path) -> ModelKey:
    return ModelKey(INCEPTION, str(weights))


class InceptionLoader:
    """FID's InceptionV3 as torchmetrics builds it (its 2048-d pool features), from a weights file already on disk.
    It always runs in float32, as torchmetrics runs it."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        path = Path(key.source)
        if not path.is_file():
            raise unavailable(key.source, FileNotFoundError(f"{path} is not a file"))
        return path.stat().st_size

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:  # torch-fidelity reads it with torch.load, which (torch >= 2.6) refuses a file that carries code
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=key.source).eval()
        except Exception as error:  # noqa: BLE001
            raise unavailable(key.source, error) from error

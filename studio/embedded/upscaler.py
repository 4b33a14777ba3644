"""Loading and running the embedded RRDBNet x4 (basicsr's architecture, weights in safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.core.model_records import ModelKey
from studio.models.upscalers import UPSCALER, UpscalerLoader

UPSCALER_DIR = "embedded-upscaler"
WEIGHTS = "RRDBNet_x4.safetensors"


def load_upscaler(models_dir: Path) -> torch.nn.Module:
    """The studio's own upscaler loader, on the folder in `models_dir` (float32, eval mode)."""
    return UpscalerLoader().load(ModelKey(UPSCALER, str(Path(models_dir) / UPSCALER_DIR)), torch.float32)


def upscale(model: torch.nn.Module, image: Image.Image) -> Image.Image:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(array)[0].clamp(0, 1)
    return Image.fromarray((out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

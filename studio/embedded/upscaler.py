"""Loading and running the embedded RRDBNet x4 (basicsr's architecture, weights in safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..basicsr_compat import rrdbnet_class

UPSCALER_DIR = "embedded-upscaler"
WEIGHTS = "RRDBNet_x4.safetensors"


def load_upscaler(models_dir: Path) -> torch.nn.Module:
    folder = Path(models_dir) / UPSCALER_DIR
    config = json.loads((folder / "config.json").read_text())
    config.pop("arch")
    model = rrdbnet_class()(**config)
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval().requires_grad_(False)


def upscale(model: torch.nn.Module, image: Image.Image) -> Image.Image:
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(array)[0].clamp(0, 1)
    return Image.fromarray((out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

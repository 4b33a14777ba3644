"""Weight files: which safetensors files a component loads, and their size read from the headers alone."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from studio.core.errors import ModelUnavailable

_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_VARIANT_MARKS = (".fp16.", ".bf16.", ".fp32.", ".ema.", ".non_ema.")


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



"""Devices, dtypes and byte counts: the small facts the memory manager is built on."""

from __future__ import annotations

import gc
import os
import re

import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


def parse_bytes(text: str | int) -> int:
    """'6GiB', '512MB', '8g' or a plain integer -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Not a size: {text!r}. Write e.g. 6GiB, 512MB or 8000000000.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but this machine has no MPS backend.")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """"float16" for torch.float16: how records, logs and messages name a dtype."""
    return str(dtype).removeprefix("torch.")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators (half the memory, the usual way to run SD); fp32 on the CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes the device can still give us: what the driver reports free plus what PyTorch's caching allocator
    holds reserved but unallocated (the driver counts that as used, yet our next tensors get it first).
    None where there is no such report (CPU, MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached_but_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached_but_free
    return None


def default_device_budget(device: torch.device) -> int:
    """How many bytes of weights plus working memory we let the device hold when no flag says otherwise."""
    if device.type == "cuda":
        return int(free_device_bytes(device) * 0.9)  # leave room for the CUDA context and fragmentation
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() * 0.8)
    return int(available_ram_bytes() * 0.6)


def default_ram_budget() -> int:
    return int(available_ram_bytes() * 0.6)


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def release_memory(device: torch.device) -> None:
    """Really give freed tensors back: drop cycles, then empty the allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ComfyUI's floor for a model's working memory on a GPU (model_management.minimum_inference_memory: 0.8 GiB) and
# its reserve for what else holds GPU memory (EXTRA_RESERVED_VRAM: 400 MiB on Linux): CUDA's own workspaces
# (cuBLAS, cuDNN, the allocator's fragmentation) take room no estimate of activations counts.
CUDA_INFERENCE_FLOOR = int(0.8 * 1024**3)
CUDA_RESERVE = 400 * 1024**2


def working_memory_on(device: torch.device, estimate: int) -> int:
    """The working memory to reserve on `device` for a stage estimated at `estimate` bytes: on CUDA as ComfyUI
    reserves it, max(floor + reserve, estimate + reserve); elsewhere the estimate."""
    if torch.device(device).type != "cuda":
        return estimate
    return max(CUDA_INFERENCE_FLOOR + CUDA_RESERVE, estimate + CUDA_RESERVE)

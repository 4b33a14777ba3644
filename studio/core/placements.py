"""How the manager places a model beyond moving it: float8 storage (diffusers' layerwise casting) and block
streaming (diffusers' group offloading), and the measures the records take of a model. studio.core.memory decides
when; this module holds the how."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from studio.core.devices import module_bytes


def first_tensor(obj: Any) -> torch.Tensor | None:
    """A module's first parameter (or buffer): where it is and in which dtype, for the records' check."""
    if not isinstance(obj, torch.nn.Module):
        return None
    return next(itertools.chain(obj.parameters(), obj.buffers()), None)


def move_to(obj: Any, device: torch.device | str) -> None:
    obj.to(device)


def store_in(module: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """diffusers' layerwise casting: each Linear and Conv layer's weights in `storage`, cast to `compute` for its
    forward only; norms and embeddings stay (a diffusers model's own list of layers to leave is used)."""
    if hasattr(module, "enable_layerwise_casting"):
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    else:  # a transformers text encoder (T5): not the layers transformers keeps in float32 either (T5's `wo`,
        # whose input it casts to the weight's dtype: a float8 matmul)
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        kept = tuple(rf"(^|\.){name}$" for name in getattr(module, "_keep_in_fp32_modules", None) or ())
        apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=compute,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + kept)


def stream_blocks(module: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    """diffusers' block-level group offloading: the model's blocks wait in RAM and each comes to `device` for its
    forward (on CUDA the next one meanwhile, on a stream of its own). Returns what takes the hooks off again."""
    from diffusers.hooks import HookRegistry, apply_group_offloading

    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=device.type == "cuda",
                           # pinned on the fly, a block at a time: pinning them all first would hold a second copy
                           # of the transformer in RAM (11 GB for FLUX in float8)
                           low_cpu_mem_usage=True)

    def remove() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
            registry.remove_hook(name, recurse=True)

    return remove


def streaming_reserve(module: torch.nn.Module) -> int:
    """What a model streamed block by block holds on the device at once: its layers outside the blocks, and two
    blocks (the one running, and the next one arriving on its stream)."""
    blocks = [block for child in module.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
              for block in child]
    sizes = [module_bytes(block) for block in blocks]
    return module_bytes(module) - sum(sizes) + 2 * max(sizes, default=0)

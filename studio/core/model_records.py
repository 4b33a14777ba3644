"""What the memory manager (studio.core.memory) keeps its books in, and what its callers hand it: a model's key,
a kind's loader, a reversible change to a model (Patch), and the records and status it reports."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from studio.core.devices import format_bytes

DEVICE = "device"
RAM = "ram"


@dataclass(frozen=True)
class ModelKey:
    """One loadable model: its kind (which loader), where it comes from, and which part of it."""

    kind: str  # "diffusers", "checkpoint", "upscaler", "clip", ...
    source: str  # Hub repo id, local folder or single-file checkpoint
    part: str = ""  # subfolder / component name ("unet", "vae"); "" for a standalone model
    config: str = ""  # a single-file checkpoint's configs (the diffusers repo id or folder that describes it);
    # a ControlNet's file variant

    @property
    def label(self) -> str:
        name = self.source.rstrip("/").rsplit("/", 1)[-1]
        return f"{name}/{self.part}" if self.part else name


class ModelLoader(Protocol):
    """What the manager needs from each kind of model."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        """Bytes the model will hold once loaded, known *before* loading (e.g. from safetensors headers)."""

    def load(self, key: ModelKey, dtype: torch.dtype) -> Any:
        """The model, loaded into host RAM."""


@dataclass(frozen=True)
class Patch:
    """A reversible change to a loaded model, made for one job (LoRA adapters). The manager applies it, records
    it and removes it, so that no shared model is changed behind its books.

    `identity`: equal identities are the same change (the same LoRAs at the same weights); a model that already
    carries it is left as it is. `apply(model, lease)` gets the stage's other leased models too (the LoRA weights)
    and, if it raises, leaves the model as it was. What it adds to the model's parameters and buffers (adapter
    layers) the manager measures; `size`: bytes it adds that they do not show. `held()`: bytes the applied patch
    keeps in host RAM outside the model (a merged LoRA's copies of the weights it changed, to put them back),
    counted against RAM's budget (the device's, where the device is the CPU); `held_bound(model, lease)`: at
    most that many, known before it is applied, so that room is made first."""

    identity: Hashable
    apply: Callable[[Any, Mapping[str, Any]], None]
    remove: Callable[[Any], None]
    size: int = 0
    held: Callable[[], int] = lambda: 0
    held_bound: Callable[[Any, Mapping[str, Any]], int] = lambda model, lease: 0


@dataclass(frozen=True)
class ModelRecord:
    source: str
    component: str
    kind: str
    size: int
    placement: str
    in_use: bool
    dtype: str = ""  # what its weights are kept in ("" for weightless parts)
    held: int = 0  # bytes its patch keeps in host RAM outside it (a merged LoRA's copies of the weights)


@dataclass(frozen=True)
class MemoryStatus:
    device: str
    device_budget: int
    device_used: int
    reserved: int
    ram_budget: int | None  # None when device and RAM are one tier (CPU)
    ram_used: int
    peak: int  # the most bytes (weights + reserved working memory) ever held on the device
    models: tuple[ModelRecord, ...]

    def summary(self) -> str:
        """One line for the UI's status bar."""
        if not self.models:
            loaded = "no models loaded"
        else:
            sources: dict[str, int] = {}
            for record in self.models:
                sources[record.source] = sources.get(record.source, 0) + record.size + record.held
            loaded = ", ".join(f"{source.rstrip('/').rsplit('/', 1)[-1]} {format_bytes(size)}"
                               for source, size in sources.items())
        line = f"{self.device}: {format_bytes(self.device_used)} of {format_bytes(self.device_budget)} budget"
        if self.ram_budget is not None:
            line += f" · RAM: {format_bytes(self.ram_used)} of {format_bytes(self.ram_budget)}"
        return f"{line} · {loaded}"

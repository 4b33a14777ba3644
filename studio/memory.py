"""The GPU memory manager: the one object that owns where model weights live.

Every tab asks it for a pipeline by (preset, task) and gets a lease:

    with manager.lease(preset, "text2img", working_memory=...) as lease:
        images = lease.pipeline(prompt, ...)

Like InvokeAI's model cache it has two tiers (the device and host RAM) and locks a model while it is in use:
- weights are held per component (UNet, VAE, text encoder ...), keyed by (source, subfolder), so pipelines of
  different tasks on one base share the very same modules: there is never a second copy;
- while a lease is held its components stay on the device and are never evicted;
- to make room, the least recently used unlocked components move off the device first (to RAM), and are
  dropped from RAM when the RAM budget is exceeded. On the CPU, device and RAM are one tier: evicting drops;
- one re-entrant device lock serialises all device work across tabs and users.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .devices import device_free_bytes, format_bytes, module_bytes, release_memory
from .errors import OutOfMemoryBudget

ComponentKey = tuple[str, str]  # (source: Hub repo id or folder, subfolder: "unet", "vae", ...)
DEVICE = "device"
RAM = "ram"


class PipelineFactory(Protocol):
    """What the manager needs to know about pipelines (see studio.pipelines.DiffusersFactory)."""

    def component_keys(self, preset, task: str) -> dict[str, ComponentKey]:
        """The components a (preset, task) pipeline is made of: role -> key. Equal keys are shared."""

    def load_component(self, preset, key: ComponentKey, dtype: torch.dtype) -> Any:
        """Load one component into host RAM."""

    def assemble(self, preset, task: str, components: dict[str, Any]) -> Any:
        """A new pipeline object over the given (shared) components."""


@dataclass
class _Entry:
    key: ComponentKey
    obj: Any
    size: int  # bytes of parameters and buffers; 0 for tokenizers and schedulers
    placement: str  # DEVICE or RAM
    locks: int = 0
    pinned: bool = False  # preloaded (ZeroGPU): never evicted
    last_used: int = 0


@dataclass(frozen=True)
class ModelRecord:
    source: str
    component: str
    size: int
    placement: str
    in_use: bool


@dataclass(frozen=True)
class MemoryStatus:
    device: str
    device_budget: int
    device_used: int
    reserved: int
    ram_budget: int | None  # None when device and RAM are one tier (CPU)
    ram_used: int
    models: tuple[ModelRecord, ...]

    def summary(self) -> str:
        """One line for the UI's status bar."""
        if not self.models:
            loaded = "no models loaded"
        else:
            sources: dict[str, int] = {}
            for record in self.models:
                sources[record.source] = sources.get(record.source, 0) + record.size
            loaded = ", ".join(f"{source.rsplit('/', 1)[-1]} {format_bytes(size)}" for source, size in sources.items())
        line = f"{self.device}: {format_bytes(self.device_used)} of {format_bytes(self.device_budget)} budget"
        if self.ram_budget is not None:
            line += f" · RAM: {format_bytes(self.ram_used)} of {format_bytes(self.ram_budget)}"
        return f"{line} · {loaded}"


@dataclass
class Lease:
    pipeline: Any
    preset: Any
    task: str


def estimate_working_memory(width: int, height: int, batch: int, dtype: torch.dtype, guidance: bool = True) -> int:
    """Bytes of activations one call needs beyond the weights, after ComfyUI's estimates for SD.

    UNet: ~0.01 MiB per latent pixel per byte of dtype (doubled by classifier-free guidance);
    VAE decode: ~2178 bytes per output pixel per byte of dtype. The larger of the two, with 10% slack.
    """
    dtype_size = torch.finfo(dtype).bits // 8
    latent_pixels = (width // 8) * (height // 8) * batch * (2 if guidance else 1)
    unet = latent_pixels * dtype_size * 0.01 * 1024 * 1024
    vae = width * height * batch * 2178 * dtype_size
    return int(max(unet, vae) * 1.1)


class ModelManager:
    def __init__(
        self,
        factory: PipelineFactory,
        device: torch.device,
        dtype: torch.dtype,
        device_budget: int,
        ram_budget: int | None = None,
        ask_driver: bool = True,
    ):
        self.factory = factory
        self.device = torch.device(device)
        self.dtype = dtype
        self.device_budget = int(device_budget)
        # On the CPU the device *is* host RAM: a single tier whose budget is the device budget.
        self.single_tier = self.device.type == "cpu"
        self.ram_budget = None if self.single_tier else ram_budget
        self.ask_driver = ask_driver  # also respect the driver's free-memory report (off on ZeroGPU)
        self._entries: dict[ComponentKey, _Entry] = {}
        self._reserved = 0
        self._clock = itertools.count(1)
        self.device_lock = threading.RLock()  # held for the whole of a lease: serialises device work
        self._state_lock = threading.Lock()  # guards the bookkeeping, so status() never waits for a generation

    # ----- leases -----

    @contextmanager
    def lease(self, preset, task: str, working_memory: int = 0) -> Iterator[Lease]:
        """Load (if needed) and place on the device what (preset, task) needs; keep it there until exit."""
        with self.device_lock:
            keys = self.factory.component_keys(preset, task)
            entries = self._load_missing(preset, keys)
            self._lock(entries.values())
            try:
                with self._state_lock:
                    self._reserved += working_memory
                try:
                    self._move_to_device(entries.values(), protected=set(keys.values()))
                    pipeline = self.factory.assemble(preset, task, {role: e.obj for role, e in entries.items()})
                    lease = Lease(pipeline=pipeline, preset=preset, task=task)
                    try:
                        yield lease
                    finally:
                        lease.pipeline = None  # the pipeline object must not outlive the lease
                finally:
                    with self._state_lock:
                        self._reserved -= working_memory
            finally:
                self._unlock(entries.values())
                self._enforce_ram_budget()

    def preload(self, preset, task: str) -> None:
        """Load and place a pipeline's components on the device for good (ZeroGPU: models live on 'cuda')."""
        with self.device_lock:
            keys = self.factory.component_keys(preset, task)
            entries = self._load_missing(preset, keys)
            self._move_to_device(entries.values(), protected=set(keys.values()))
            with self._state_lock:
                for entry in entries.values():
                    entry.pinned = True

    # ----- state -----

    def status(self) -> MemoryStatus:
        with self._state_lock:
            models = tuple(
                ModelRecord(e.key[0], e.key[1], e.size, e.placement, e.locks > 0)
                for e in sorted(self._entries.values(), key=lambda e: e.last_used)
                if e.size > 0
            )
            return MemoryStatus(
                device=str(self.device),
                device_budget=self.device_budget,
                device_used=self._device_used(),
                reserved=self._reserved,
                ram_budget=self.ram_budget,
                ram_used=self._ram_used(),
                models=models,
            )

    def loaded_object(self, key: ComponentKey) -> Any | None:
        """The loaded component for `key`, if any (for tests and diagnostics)."""
        with self._state_lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.obj

    def unload_all(self) -> None:
        with self.device_lock, self._state_lock:
            for key in [k for k, e in self._entries.items() if e.locks == 0 and not e.pinned]:
                del self._entries[key]
        release_memory(self.device)

    # ----- internals (call with device_lock held) -----

    def _load_missing(self, preset, keys: dict[str, ComponentKey]) -> dict[str, _Entry]:
        """Entries for every role; loads what is missing. On failure, what this call loaded is dropped again."""
        loaded_now: list[ComponentKey] = []
        try:
            for key in dict.fromkeys(keys.values()):
                with self._state_lock:
                    known = key in self._entries
                if known:
                    continue
                obj = self.factory.load_component(preset, key, self.dtype)
                size = module_bytes(obj) if isinstance(obj, torch.nn.Module) else 0
                placement = DEVICE if self.single_tier and size else RAM
                with self._state_lock:
                    self._entries[key] = _Entry(key, obj, size, placement, last_used=next(self._clock))
                loaded_now.append(key)
        except BaseException:
            with self._state_lock:
                for key in loaded_now:
                    del self._entries[key]
            release_memory(self.device)
            raise
        with self._state_lock:
            return {role: self._entries[key] for role, key in keys.items()}

    def _lock(self, entries) -> None:
        with self._state_lock:
            for entry in entries:
                entry.locks += 1

    def _unlock(self, entries) -> None:
        with self._state_lock:
            for entry in entries:
                entry.locks -= 1
                entry.last_used = next(self._clock)

    def _move_to_device(self, entries, protected: set[ComponentKey]) -> None:
        entries = list({id(e): e for e in entries}.values())
        needed = sum(e.size for e in entries if e.placement != DEVICE)
        self._make_room_on_device(needed, protected)
        for entry in entries:
            if entry.placement != DEVICE and entry.size:
                entry.obj.to(self.device)
                with self._state_lock:
                    entry.placement = DEVICE

    def _device_free(self) -> int:
        with self._state_lock:
            free = self.device_budget - self._device_used() - self._reserved
        # Other processes and fragmentation count too: never plan beyond what the driver says is free.
        driver_free = device_free_bytes(self.device) if self.ask_driver else None
        return free if driver_free is None else min(free, driver_free - self._reserved)

    def _make_room_on_device(self, needed: int, protected: set[ComponentKey]) -> None:
        while self._device_free() < needed:
            with self._state_lock:
                victim = self._least_recently_used(DEVICE, protected)
            if victim is None:
                raise OutOfMemoryBudget(
                    f"Not enough device memory: this request needs {format_bytes(needed)} more on {self.device} "
                    f"(budget {format_bytes(self.device_budget)}, {format_bytes(self._reserved)} reserved for "
                    "working memory) and nothing else can be unloaded. Try a smaller size or batch, or a smaller "
                    "preset."
                )
            if self.single_tier:
                self._drop(victim)
            else:
                self._offload(victim)

    def _enforce_ram_budget(self) -> None:
        if self.ram_budget is None:
            return
        while True:
            with self._state_lock:
                if self._ram_used() <= self.ram_budget:
                    return
                victim = self._least_recently_used(RAM, protected=set())
            if victim is None:
                return  # everything in RAM is in use; it is freed once the leases end
            self._drop(victim)

    def _least_recently_used(self, placement: str, protected: set[ComponentKey]) -> _Entry | None:
        candidates = [
            e
            for e in self._entries.values()
            if e.placement == placement and e.locks == 0 and not e.pinned and e.size and e.key not in protected
        ]
        return min(candidates, key=lambda e: e.last_used, default=None)

    def _offload(self, entry: _Entry) -> None:
        entry.obj.to("cpu")
        with self._state_lock:
            entry.placement = RAM
        release_memory(self.device)

    def _drop(self, entry: _Entry) -> None:
        with self._state_lock:
            del self._entries[entry.key]
        entry.obj = None
        release_memory(self.device)

    def _device_used(self) -> int:
        return sum(e.size for e in self._entries.values() if e.placement == DEVICE)

    def _ram_used(self) -> int:
        if self.single_tier:
            return self._device_used()
        return sum(e.size for e in self._entries.values() if e.placement == RAM)

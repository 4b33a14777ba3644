"""The GPU memory manager: the one object that owns where model weights live.

It holds any model through a loader registered for its kind ("diffusers" components, upscaler networks, CLIP
scorers ...), keyed by (kind, source, part), so identical parts are shared however many tasks use them. Work is
done in stages, each of which holds on the device only what it uses:

    with manager.use({"denoiser": denoiser_key, "vae": vae_key}, working_memory=...) as models:
        latents = ...  # models["denoiser"] is on the device until the block ends

Like InvokeAI's model cache it has two tiers (the device and host RAM) and locks a model while a stage uses it:
- room is made *before* anything is loaded or moved: least recently used unlocked models leave the device
  first (to RAM, which drops its own least recently used when full); on the CPU, device and RAM are one tier
  and eviction drops. The bytes held (weights + reserved working memory) never exceed the budget;
- a move that fails half way is rolled back; a load that fails leaves nothing behind;
- one device lock serialises device work, stage by stage; jobs take turns (`turn()`) one image or grid cell
  at a time, granted in arrival order, so a long job cannot keep others out between its images;
- changes to a shared model (a job's LoRA adapters) are `Patch`es the manager applies and records: they stay
  across one job's consecutive turns and are removed before any other job's turn;
- a model too large for the device may be *stored* in float8 (kept so until unloaded) or, the last resort, have
  its blocks *streamed* from RAM one at a time: studio.core.placements says how.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from studio.core.devices import dtype_name, format_bytes, module_bytes, release_memory
from studio.core.errors import ModelUnavailable, OutOfMemoryBudget
from studio.core.fair_lock import FairLock
from studio.core.model_records import DEVICE, RAM, MemoryStatus, ModelKey, ModelLoader, ModelRecord, Patch
from studio.core.placements import first_tensor, move_to, store_in, stream_blocks, streaming_reserve

log = logging.getLogger("studio.core.memory")


@dataclass
class _Entry:
    key: ModelKey
    obj: Any
    size: int  # bytes of parameters and buffers (a patch's included); 0 for tokenizers and schedulers
    placement: str  # DEVICE or RAM
    locks: int = 0
    pinned: bool = False  # preloaded (ZeroGPU): never evicted
    last_used: int = 0
    patch: Patch | None = None  # the change it carries now
    held: int = 0  # bytes its patch keeps in host RAM outside it (Patch.held)
    dtype: torch.dtype | None = None  # what its floating weights are in now (a lease may cast it for a while)
    dtype_as_loaded: torch.dtype | None = None  # ... and between leases: what its loader made
    storage: torch.dtype | None = None  # its weights stored in this dtype (float8), computed in `dtype`


class ModelManager:
    def __init__(
        self,
        loaders: Mapping[str, ModelLoader],
        device: torch.device | str,
        dtype: torch.dtype,
        device_budget: int,
        ram_budget: int | None = None,
        free_memory: Callable[[], int | None] | None = None,
        two_tiers: bool | None = None,
        loading_allowed: bool = True,
        move: Callable[[Any, torch.device | str], None] = move_to,
        dtype_for: Callable[[ModelKey, torch.dtype], torch.dtype] | None = None,
        stream: Callable[[torch.nn.Module, torch.device], Callable[[], None]] = stream_blocks,
    ):
        """`free_memory()` is what the device really has free (driver free + the allocator's cached-but-unused
        bytes; None where there is no report); `two_tiers` defaults to "not the CPU"; `loading_allowed=False`
        refuses loads (ZeroGPU's GPU worker: everything is preloaded in the main process); `move(obj, device)`
        places a model (the device planner passes a no-op for weights on the meta device); `dtype_for(key, dtype)`
        is the dtype a model is loaded in where it is not the manager's (SD 3 and FLUX: bfloat16 on a GPU);
        `stream(model, device)` streams a model's blocks and returns what stops it (the planner: nothing)."""
        self.loaders = dict(loaders)
        self.device = torch.device(device)
        self.dtype = dtype
        self._dtype_for = dtype_for or (lambda key, dtype: dtype)
        self.device_budget = int(device_budget)
        self.two_tiers = self.device.type != "cpu" if two_tiers is None else two_tiers
        self.ram_budget = ram_budget if self.two_tiers else None
        self.free_memory = free_memory
        self.loading_allowed = loading_allowed
        self._move_fn = move
        self._stream_fn = stream
        self._entries: dict[ModelKey, _Entry] = {}
        self._reserved = 0
        self._peak = 0
        self._loads = 0
        self._clock = itertools.count(1)
        self._patch_owner: object | None = None  # the job whose turns the recorded patches are for
        self._make_locks()
        # ZeroGPU forks its GPU worker from a handler thread while other threads may hold these locks (the status
        # line reads the books at any time): the child starts with fresh ones, not copies held by no one.
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: reference() and reference()._make_locks())

    def _make_locks(self) -> None:
        self.device_lock = FairLock()  # held for the whole of a stage: serialises device work
        self._turns = FairLock()  # held for one image (or one grid cell) of a job: jobs take turns
        self._state_lock = threading.Lock()  # guards the bookkeeping, so status() never waits for a stage

    @contextmanager
    def turn(self, owner: object | None = None) -> Iterator[None]:
        """One job's turn on the device, for one image or one grid cell: `with manager.turn(job): ...stages...`.
        Turns are granted in arrival order, so a job that finishes an image and asks again goes behind the jobs
        already waiting: a quick image waits for at most one image of a long batch, not the whole batch. Never
        take a turn while holding the device lock.

        Patches (a job's LoRAs) stay on the models across the consecutive turns of their `owner`; a turn of any
        other owner (or of none) first removes every patch, so no job runs on models another job changed."""
        with self._turns:
            if owner is None or owner is not self._patch_owner:
                try:
                    self.remove_patches()
                except Exception:  # noqa: BLE001 - logged by _unpatch; the model is unloaded, this job goes on
                    pass
                self._patch_owner = owner
            yield

    # ----- stages -----

    @contextmanager
    def use(self, keys: Mapping[str, ModelKey], working_memory: int = 0, on_device: bool = True,
            patches: Mapping[str, Patch] | None = None,
            dtypes: Mapping[str, torch.dtype] | None = None,
            storage: Mapping[str, torch.dtype] | None = None,
            in_ram: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
        """Place every model of `keys` (role -> key) on the device and keep it there, locked, until the block
        ends; `working_memory` bytes are reserved for the stage's activations. Holds the device lock.

        `patches` (role -> Patch): the models of those roles carry that patch for the block (and after it, until
        another job's turn or a lease without it); every other leased model carries none.

        `dtypes` (role -> dtype): those models are cast for the block and back after it, recorded as such (SDXL's
        own VAE decodes in float32 under float16); `working_memory` must include what the cast adds.

        `storage` (role -> dtype): those models are stored so from now on (float8: placements.store_in), before
        they reach the device. `on_device=False` keeps the models locked in RAM instead, for accelerate's model CPU
        offload, which moves one at a time to the device: the largest model's bytes are reserved for that.
        `in_ram` (roles): only those stay in RAM (see `block_streaming`)."""
        with self.device_lock:
            wanted = list(dict.fromkeys(keys.values()))
            stored = {keys[role]: dtype for role, dtype in (storage or {}).items() if role in keys}
            entries, reserved = self._place(wanted, working_memory, on_device, stored,
                                            {keys[role] for role in in_ram if role in keys})
            cast: list[_Entry] = []
            try:
                lease = {role: entries[key].obj for role, key in keys.items()}
                self._patch({role: entries[key] for role, key in keys.items()}, patches or {}, lease)
                for role, dtype in (dtypes or {}).items():
                    self._cast(entries[keys[role]], dtype, cast)
                yield lease
            finally:
                try:
                    for entry in cast:
                        self._cast(entry, entry.dtype_as_loaded, [])
                    self._reassert(wanted)
                finally:
                    self._unlock(entries.values())
                    with self._state_lock:
                        self._reserved -= reserved

    @contextmanager
    def model_offload(self, keys: Mapping[str, ModelKey], working_memory: int = 0,
                      patches: Mapping[str, Patch] | None = None,
                      dtypes: Mapping[str, torch.dtype] | None = None,
                      storage: Mapping[str, torch.dtype] | None = None) -> Iterator[dict[str, Any]]:
        """A lease under accelerate's model CPU offload, the last resort after an out-of-memory: the models wait
        in RAM and each is moved to the device only while its forward runs, chained in the order of `keys` (the
        order they run), so one model is on the device at a time; room is reserved for the largest. Pinned models
        stay on the device, unhooked. When the block ends every model is where the records say."""
        from accelerate import cpu_offload_with_hook

        with self.use(keys, working_memory, on_device=False, patches=patches, dtypes=dtypes,
                      storage=storage) as lease:
            hooks = []
            for role, key in keys.items():
                with self._state_lock:
                    entry = self._entries.get(key)
                if entry is None or entry.pinned or not entry.size or not isinstance(entry.obj, torch.nn.Module):
                    continue
                _, hook = cpu_offload_with_hook(entry.obj, self.device, prev_module_hook=hooks[-1] if hooks else None)
                hooks.append(hook)
            try:
                yield lease
            finally:
                for hook in hooks:
                    hook.offload()
                    hook.remove()
                self._reassert(keys.values())

    @contextmanager
    def block_streaming(self, keys: Mapping[str, ModelKey], streamed: frozenset[str], working_memory: int = 0,
                        patches: Mapping[str, Patch] | None = None, dtypes: Mapping[str, torch.dtype] | None = None,
                        storage: Mapping[str, torch.dtype] | None = None) -> Iterator[dict[str, Any]]:
        """A lease whose `streamed` models (roles) stay in RAM and stream their blocks to the device one at a time
        (placements.stream_blocks), the last resort: room is reserved for their layers outside the blocks and two
        blocks each; the other models are on the device. Afterwards, every model is where the records say."""
        streamed = frozenset(role for role in streamed if role in keys)
        with self.use(keys, working_memory, patches=patches, dtypes=dtypes, storage=storage,
                      in_ram=streamed) as lease:
            streaming = sum(streaming_reserve(lease[role]) for role in streamed)
            self._make_room_on_device(streaming, set(keys.values()))
            with self._state_lock:
                self._reserved += streaming
            stops = []
            try:
                for role in sorted(streamed):
                    stops.append(self._stream_fn(lease[role], self.device))
                self._note_peak()
                yield lease
            finally:
                for stop in stops:
                    stop()
                with self._state_lock:
                    self._reserved -= streaming

    def preload(self, keys: Mapping[str, ModelKey], pin: bool = False) -> None:
        """Load and place models on the device before anyone asks. `pin=True` keeps them there for good
        (ZeroGPU: everything lives on 'cuda' from the start); otherwise they are evicted like any other."""
        with self.device_lock:
            entries, _ = self._place(list(dict.fromkeys(keys.values())), 0, on_device=True)
            self._unlock(entries.values())
            with self._state_lock:
                for entry in entries.values():
                    entry.pinned = entry.pinned or pin

    def offload_idle(self) -> None:
        """Move every unlocked, unpinned model off the device (out-of-memory recovery)."""
        with self.device_lock:
            while True:
                with self._state_lock:
                    victim = self._least_recently_used(DEVICE, protected=set())
                if victim is None:
                    return
                self._evict(victim)

    def remove_patches(self) -> None:
        """Every model back as it was loaded (each job's turn starts so, unless it is the same job's)."""
        with self.device_lock:
            with self._state_lock:
                patched = [entry for entry in self._entries.values() if entry.patch is not None]
            failed = None
            for entry in patched:  # each apart: one that cannot be removed must not leave the others on
                try:
                    self._unpatch(entry)
                except Exception as error:  # noqa: BLE001 - raised below, after the others
                    failed = failed or error
            if failed is not None:
                raise failed

    def carries(self, key: ModelKey, identity: Hashable) -> bool:
        """Whether the loaded model `key` carries the patch `identity` now (a stage's plan then needs no room to
        apply it)."""
        with self._state_lock:
            entry = self._entries.get(key)
            return entry is not None and entry.patch is not None and entry.patch.identity == identity

    # ----- state -----

    def status(self) -> MemoryStatus:
        with self._state_lock:
            models = tuple(
                ModelRecord(e.key.source, e.key.part, e.key.kind, e.size, e.placement, e.locks > 0,
                            dtype_name(e.storage or e.dtype) if e.size and e.dtype else "", e.held)
                for e in sorted(self._entries.values(), key=lambda e: e.last_used)
                if e.size > 0
            )
            return MemoryStatus(
                device=str(self.device), device_budget=self.device_budget, device_used=self._device_used(),
                reserved=self._reserved, ram_budget=self.ram_budget, ram_used=self._ram_used(), peak=self._peak,
                models=models,
            )

    @property
    def loads(self) -> int:
        """How many models this manager has loaded (ZeroGPU tests: none may load inside the GPU worker)."""
        return self._loads

    def is_loaded(self, key: ModelKey) -> bool:
        with self._state_lock:
            return key in self._entries

    def loaded_object(self, key: ModelKey) -> Any | None:
        """The loaded model for `key`, if any (for tests and diagnostics)."""
        with self._state_lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.obj

    # ----- internals (called with the device lock held) -----

    def _place(self, wanted: list[ModelKey], working_memory: int, on_device: bool,
               stored: Mapping[ModelKey, torch.dtype] | None = None,
               in_ram: set[ModelKey] | frozenset = frozenset()) -> tuple[dict[ModelKey, _Entry], int]:
        """Lock, load (room first) and move to the device (or to RAM) every key (those of `in_ram` to RAM);
        reserve the working memory; models of `stored` stored in their dtype first. Returns the entries and the
        bytes reserved. On any failure everything this call did is undone (but a storage: it is kept)."""
        stored = stored or {}
        protected = set(wanted)
        locked: list[_Entry] = []
        loaded_now: list[_Entry] = []
        with self._state_lock:
            for key in wanted:
                if key in self._entries:
                    self._entries[key].locks += 1
                    locked.append(self._entries[key])
        reserved = 0  # what this call has added to self._reserved: only that is given back on failure
        try:
            for entry in locked:
                if entry.key in stored:
                    self._store(entry, stored[entry.key])
            loaded = {e.key for e in locked}
            sizes = {key: self._size_of(key, stored.get(key)) for key in wanted if key not in loaded}
            if on_device:
                to_reserve = working_memory
                needed = (sum(size for key, size in sizes.items() if key not in in_ram)
                          + sum(e.size for e in locked if e.placement != DEVICE and e.key not in in_ram))
            else:
                to_reserve = working_memory + max([*sizes.values(), *(e.size for e in locked), 0])
                needed = 0 if self.two_tiers else sum(sizes.values())
            self._make_room_on_device(needed + to_reserve, protected)
            with self._state_lock:
                self._reserved += to_reserve
            reserved = to_reserve
            for key, size in sizes.items():
                entry = self._load(key, size, protected, stored.get(key))
                locked.append(entry)
                loaded_now.append(entry)
            for entry in locked:
                target = DEVICE if on_device and entry.key not in in_ram else RAM
                if entry.placement == target or not entry.size or not self.two_tiers or entry.pinned:
                    continue
                if target == DEVICE:  # its real size, which a short estimate may not have made room for
                    self._make_room_on_device(entry.size, protected)
                self._transfer(entry, target)
            self._note_peak()
        except BaseException:
            with self._state_lock:
                self._reserved -= reserved
            self._unlock(locked)
            for entry in loaded_now:  # what this call loaded goes again: the manager is as it was
                self._drop(entry)
            self._make_room_in_ram(0, protected=set())  # what was offloaded on the way may now be over RAM's budget
            raise
        return {entry.key: entry for entry in locked}, reserved

    def _size_of(self, key: ModelKey, storage: torch.dtype | None = None) -> int:
        if not self.loading_allowed:
            raise ModelUnavailable(
                f"{key.label} is not loaded, and this worker may not load models (on ZeroGPU every public preset is "
                "loaded when the Space starts). Restart the Space or pick a preloaded preset."
            )
        return int(self._loader(key).size(key, storage or self.dtype_of(key)))

    def dtype_of(self, key: ModelKey) -> torch.dtype:
        """The dtype a model is loaded in: the manager's, unless its family computes in another."""
        return self._dtype_for(key, self.dtype)

    def _loader(self, key: ModelKey) -> ModelLoader:
        try:
            return self.loaders[key.kind]
        except KeyError:
            raise ModelUnavailable(f"No loader is registered for models of kind {key.kind!r}.") from None

    def _load(self, key: ModelKey, expected_size: int, protected: set[ModelKey],
              storage: torch.dtype | None = None) -> _Entry:
        """Load (room was made on the device for it); a new entry, locked, stored in `storage` if given (before it
        is recorded, so before it reaches the device). On two tiers the model passes through RAM on its way to the
        device; RAM's budget is for models kept there, so it is not made room for."""
        obj = self._loader(key).load(key, self.dtype_of(key))
        self._loads += 1
        tensor = first_tensor(obj)
        dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else None  # a loader may keep fp32
        storage = storage if dtype is not None else None
        if storage is not None:  # stored before it is recorded; it computes in the dtype it was loaded in
            store_in(obj, storage, dtype)
        size = module_bytes(obj) if isinstance(obj, torch.nn.Module) else 0
        entry = _Entry(key, obj, size, DEVICE if not self.two_tiers and size else RAM, locks=1,
                       last_used=next(self._clock), dtype=dtype, dtype_as_loaded=dtype, storage=storage)
        with self._state_lock:
            self._entries[key] = entry
        self._note_peak()
        if size > expected_size:  # the estimate was short (e.g. buffers not in the files): settle the difference
            try:
                self._make_room_on_device(0, protected)
            except OutOfMemoryBudget:
                self._drop(entry)
                raise
        return entry

    def _transfer(self, entry: _Entry, placement: str) -> None:
        """Move a model between the device and RAM. A move that fails half way (out of memory after some
        tensors moved) is rolled back to where the model was; if even that fails, the model is dropped."""
        target = self.device if placement == DEVICE else torch.device("cpu")
        origin = torch.device("cpu") if placement == DEVICE else self.device
        try:
            self._move_fn(entry.obj, target)
        except BaseException:
            try:
                self._move_fn(entry.obj, origin)
            except BaseException:  # noqa: BLE001 - a model in an unknown state must not stay recorded
                self._drop(entry)
            release_memory(self.device)
            raise
        with self._state_lock:
            entry.placement = placement
        if placement == RAM:
            release_memory(self.device)

    def _device_free(self) -> int:
        with self._state_lock:
            free = self.device_budget - self._device_used() - self._reserved
        # Other processes and fragmentation count too: never plan beyond what the device really has free.
        really_free = self.free_memory() if self.free_memory else None
        return free if really_free is None else min(free, really_free - self._reserved)

    def _make_room_on_device(self, needed: int, protected: set[ModelKey]) -> None:
        """Evict least recently used models until `needed` bytes are free; refuse *before* evicting anything
        when even evicting everything allowed would not be enough."""
        with self._state_lock:
            evictable = sum(e.size + (0 if self.two_tiers else e.held) for e in self._entries.values()
                            if e.placement == DEVICE and e.locks == 0 and not e.pinned and e.key not in protected)
        if self._device_free() + evictable < needed:
            self._refuse(needed)
        while self._device_free() < needed:
            with self._state_lock:
                victim = self._least_recently_used(DEVICE, protected)
            if victim is None:
                self._refuse(needed)
            self._evict(victim)

    def _refuse(self, needed: int) -> None:
        raise OutOfMemoryBudget(
            f"Not enough device memory: this stage needs {format_bytes(needed)} on {self.device} "
            f"(budget {format_bytes(self.device_budget)}, {format_bytes(self._device_used())} held by models "
            "in use) and nothing else can be unloaded. Try a smaller size or batch, or a smaller preset."
        )

    def _evict(self, entry: _Entry) -> None:
        if self.two_tiers:
            self._make_room_in_ram(entry.size, protected={entry.key})
            self._transfer(entry, RAM)
        else:
            self._drop(entry)

    def _make_room_in_ram(self, needed: int, protected: set[ModelKey]) -> None:
        if self.ram_budget is None:
            return
        while True:
            with self._state_lock:
                if self._ram_used() + needed <= self.ram_budget:
                    return
                victim = self._least_recently_used(RAM, protected)
            if victim is None:
                return  # what is in RAM is in use; RAM is a soft limit, the device budget is the hard one
            self._drop(victim)

    def _least_recently_used(self, placement: str, protected: set[ModelKey]) -> _Entry | None:
        candidates = [
            e for e in self._entries.values()
            if e.placement == placement and e.locks == 0 and not e.pinned and e.size and e.key not in protected
        ]
        return min(candidates, key=lambda e: e.last_used, default=None)

    def _drop(self, entry: _Entry) -> None:
        with self._state_lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
        if entry.patch is not None:  # what it keeps to put the model back goes with the model
            try:
                entry.patch.remove(entry.obj)
            except Exception:  # noqa: BLE001 - the model goes anyway
                log.debug("a patch of %s could not be removed as its model was dropped", entry.key.label)
        entry.obj, entry.patch, entry.held = None, None, 0
        release_memory(self.device)

    def _reassert(self, keys) -> None:
        """Every leased model back where, and in the dtype, the records say. Code the manager lends a model to may
        move or cast it (accelerate's offload hooks; diffusers' SDXL img2img upcasts its VAE to encode and casts it to
        the pipeline's dtype after): the records stay the truth, so the model is put back."""
        for key in dict.fromkeys(keys):
            with self._state_lock:
                entry = self._entries.get(key)
            tensor = first_tensor(entry.obj) if entry is not None else None
            if tensor is None or tensor.device.type == "meta":
                continue
            expected = self.device if entry.placement == DEVICE else torch.device("cpu")
            if tensor.device.type != expected.type:
                log.debug("%s was moved to %s behind the records: back to %s", key.label, tensor.device, expected)
                self._move_fn(entry.obj, expected)
            if (entry.dtype is not None and entry.storage is None and tensor.is_floating_point()
                    and tensor.dtype != entry.dtype):
                log.debug("%s was cast to %s behind the records: back to %s", key.label, tensor.dtype, entry.dtype)
                entry.obj.to(dtype=entry.dtype)

    def _store(self, entry: _Entry, storage: torch.dtype) -> None:
        """A loaded model stored in `storage` from now on (where it is: its bytes only shrink), recorded so."""
        # not a pinned (ZeroGPU) model: stored in a forked worker, it would be so there only, unknown to the records
        if entry.storage is None and not entry.pinned and isinstance(entry.obj, torch.nn.Module) and entry.dtype:
            store_in(entry.obj, storage, entry.dtype)
            with self._state_lock:
                entry.storage, entry.size = storage, module_bytes(entry.obj) + (entry.patch.size if entry.patch else 0)
            log.info("%s stored in %s to fit %s", entry.key.label, dtype_name(storage), self.device)
            release_memory(self.device)

    def _cast(self, entry: _Entry, dtype: torch.dtype | None, cast: list[_Entry]) -> None:
        """The model in `dtype`, its record too (its bytes change with it); `cast` collects what is to go back."""
        if (dtype is None or entry.dtype is None or dtype == entry.dtype or entry.storage is not None
                or not isinstance(entry.obj, torch.nn.Module)):
            return  # a stored model computes in the dtype its storage casts to
        entry.obj.to(dtype=dtype)
        with self._state_lock:
            entry.dtype, entry.size = dtype, module_bytes(entry.obj) + (entry.patch.size if entry.patch else 0)
        cast.append(entry)
        self._note_peak()

    def _patch(self, entries: Mapping[str, _Entry], patches: Mapping[str, Patch], lease: Mapping[str, Any]) -> None:
        """Each leased model with exactly the patch `patches` names for its role (none where it names none), its
        bytes and what the patch keeps in RAM on the books. Room is made before applying, for the patch's bound
        on what it will keep (least recently used idle models leave RAM, or on the CPU the device), then settled
        with what it really added; a patch there is no room for is taken off again and the error raised."""
        protected = {e.key for e in entries.values()}
        for role, entry in entries.items():
            wanted = patches.get(role)
            if entry.patch is not None and (wanted is None or entry.patch.identity != wanted.identity):
                self._unpatch(entry)
            if wanted is None or entry.patch is not None:
                continue
            self._make_room_for_held(wanted.held_bound(entry.obj, lease), protected)
            wanted.apply(entry.obj, lease)
            before = entry.size
            with self._state_lock:
                entry.patch, entry.size, entry.held = wanted, self._bytes_of(entry) + wanted.size, wanted.held()
            try:
                self._make_room_for_held(0, protected)
                if entry.size > before and entry.placement == DEVICE:  # adapter layers left on the model
                    self._make_room_on_device(0, protected)
            except OutOfMemoryBudget:
                self._unpatch(entry)
                raise
            self._note_peak()

    def _make_room_for_held(self, needed: int, protected: set[ModelKey]) -> None:
        """Room for `needed` more bytes kept in host RAM: RAM's (a soft limit) on two tiers, the device's on one."""
        if self.two_tiers:
            self._make_room_in_ram(needed, protected)
        else:
            self._make_room_on_device(needed, protected)

    def _bytes_of(self, entry: _Entry, without: Patch | None = None) -> int:
        """A model's bytes as its parameters and buffers show them now (a patch's adapter layers included); for
        an object that is not a module, its recorded size less `without`'s declared bytes."""
        if isinstance(entry.obj, torch.nn.Module):
            return module_bytes(entry.obj)
        return entry.size - (without.size if without is not None else 0)

    def _unpatch(self, entry: _Entry) -> None:
        """The patch off the model. A model whose patch cannot be removed is in an unknown state: it is dropped
        (loaded again, clean, when next asked for), and the error is raised."""
        patch = entry.patch
        try:
            patch.remove(entry.obj)
        except BaseException:
            log.exception("could not remove a patch from %s: the model is unloaded", entry.key.label)
            self._drop(entry)
            raise
        with self._state_lock:
            entry.patch, entry.size, entry.held = None, self._bytes_of(entry, without=patch), 0

    def _unlock(self, entries) -> None:
        with self._state_lock:
            for entry in entries:
                entry.locks -= 1
                entry.last_used = next(self._clock)

    def _note_peak(self) -> None:
        with self._state_lock:
            self._peak = max(self._peak, self._device_used() + self._reserved)

    def _device_used(self) -> int:
        used = sum(e.size for e in self._entries.values() if e.placement == DEVICE)
        return used if self.two_tiers else used + self._held()

    def _ram_used(self) -> int:
        if not self.two_tiers:
            return self._device_used()
        return sum(e.size for e in self._entries.values() if e.placement == RAM) + self._held()

    def _held(self) -> int:
        """What the models' patches keep in host RAM outside them."""
        return sum(e.held for e in self._entries.values())

"""The GPU memory manager, with small modules and a fake device (there is no GPU here)."""

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from studio.errors import ModelUnavailable, OutOfMemoryBudget
from studio.memory import DEVICE, RAM, ModelManager, estimate_working_memory

KB = 1024


class FakeGpuModule(torch.nn.Module):
    """A module of a chosen size whose .to() records the device instead of moving (no CUDA here)."""

    def __init__(self, size_bytes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size_bytes // 4))
        self.on = "cpu"

    def to(self, device, *args, **kwargs):
        self.on = str(device)
        return self


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    inpaint_source: str | None = None


class FakeFactory:
    """Components of 100/20/10 KB for (unet/vae/text_encoder), like SD's proportions, plus a tokenizer."""

    SIZES = {"unet": 100 * KB, "vae": 20 * KB, "text_encoder": 10 * KB}

    def __init__(self, fail_on: set | None = None):
        self.loads = []
        self.fail_on = fail_on or set()

    def component_keys(self, preset, task):
        keys = {role: (preset.source, role) for role in (*self.SIZES, "tokenizer")}
        if task == "inpaint" and preset.inpaint_source:
            keys["unet"] = (preset.inpaint_source, "unet")
        return keys

    def load_component(self, preset, key, dtype):
        if key in self.fail_on:
            raise ModelUnavailable(f"cannot load {key}")
        self.loads.append(key)
        role = key[1]
        return {"tokenizer": "a tokenizer"}.get(role) or FakeGpuModule(self.SIZES[role])

    def assemble(self, preset, task, components):
        return dict(components)


A = Preset("a", "repo/a", inpaint_source="repo/a-inpaint")
B = Preset("b", "repo/b")
C = Preset("c", "repo/c")
PIPELINE = 130 * KB  # one preset's unet + vae + text encoder


def gpu_manager(factory=None, device_budget=1000 * KB, ram_budget=None):
    return ModelManager(factory or FakeFactory(), torch.device("cuda"), torch.float16, device_budget=device_budget,
                        ram_budget=ram_budget, ask_driver=False)


def placements(manager):
    return {(r.source, r.component): r.placement for r in manager.status().models}


def test_tasks_on_one_base_share_every_module():
    manager = gpu_manager()
    with manager.lease(B, "text2img") as lease:
        text2img = lease.pipeline
    with manager.lease(B, "inpaint") as lease:
        inpaint = lease.pipeline
    for role in ("unet", "vae", "text_encoder", "tokenizer"):
        assert inpaint[role] is text2img[role]
    assert manager.status().device_used == PIPELINE


def test_dedicated_inpaint_checkpoint_shares_vae_and_text_encoder():
    factory = FakeFactory()
    manager = gpu_manager(factory)
    with manager.lease(A, "text2img") as lease:
        text2img = lease.pipeline
    with manager.lease(A, "inpaint") as lease:
        inpaint = lease.pipeline
    assert inpaint["vae"] is text2img["vae"] and inpaint["text_encoder"] is text2img["text_encoder"]
    assert inpaint["unet"] is not text2img["unet"]
    assert factory.loads.count(("repo/a", "vae")) == 1
    assert manager.status().device_used == PIPELINE + 100 * KB


def test_lease_places_modules_on_the_device_and_accounts_their_bytes():
    manager = gpu_manager()
    with manager.lease(A, "text2img", working_memory=50 * KB) as lease:
        assert lease.pipeline["unet"].on == "cuda"
        status = manager.status()
        assert status.device_used == PIPELINE and status.reserved == 50 * KB
        assert all(record.in_use for record in status.models)
    assert manager.status().reserved == 0
    assert not any(record.in_use for record in manager.status().models)


def test_least_recently_used_is_offloaded_first():
    manager = gpu_manager(device_budget=2 * PIPELINE + 10 * KB)
    for preset in (A, B):
        with manager.lease(preset, "text2img"):
            pass
    with manager.lease(A, "text2img"):  # A is now more recent than B
        pass
    with manager.lease(C, "text2img"):
        pass
    where = placements(manager)
    # C needs 130 KB and 10 KB are free: B's unet (100 KB) and vae (20 KB) go, B's text encoder may stay.
    assert where[("repo/b", "unet")] == RAM and where[("repo/b", "vae")] == RAM
    assert where[("repo/b", "text_encoder")] == DEVICE
    assert {where[("repo/a", role)] for role in ("unet", "vae", "text_encoder")} == {DEVICE}
    assert {where[("repo/c", role)] for role in ("unet", "vae", "text_encoder")} == {DEVICE}
    assert manager.status().device_used <= manager.device_budget


def test_only_what_is_needed_is_offloaded():
    # Room for C's 130 KB is made by offloading B's unet (100 KB, least recently used) and its vae, not A's.
    manager = gpu_manager(device_budget=3 * PIPELINE - 30 * KB)
    for preset in (B, A, C):
        with manager.lease(preset, "text2img"):
            pass
    where = placements(manager)
    assert where[("repo/a", "unet")] == DEVICE and where[("repo/c", "unet")] == DEVICE
    assert where[("repo/b", "unet")] == RAM


def test_leased_modules_are_never_evicted():
    manager = gpu_manager(device_budget=PIPELINE + 50 * KB)
    with manager.lease(A, "text2img") as outer:
        with pytest.raises(OutOfMemoryBudget, match="Not enough device memory"):
            with manager.lease(B, "text2img"):
                pass
        assert outer.pipeline["unet"].on == "cuda"
        where = placements(manager)
        assert {where[("repo/a", role)] for role in ("unet", "vae", "text_encoder")} == {DEVICE}
        assert {where[("repo/b", role)] for role in ("unet", "vae", "text_encoder")} == {RAM}  # loaded, kept
    # Once released, A can make way for B.
    with manager.lease(B, "text2img"):
        pass
    assert placements(manager)[("repo/a", "unet")] == RAM


def test_working_memory_reserve_counts_against_the_budget():
    manager = gpu_manager(device_budget=2 * PIPELINE)
    with manager.lease(A, "text2img"):
        pass
    with manager.lease(B, "text2img", working_memory=PIPELINE):  # A must leave to make room for the reserve
        pass
    assert placements(manager)[("repo/a", "unet")] == RAM


def test_ram_budget_drops_least_recently_used_offloaded_models():
    factory = FakeFactory()
    manager = gpu_manager(factory, device_budget=PIPELINE, ram_budget=PIPELINE)
    for preset in (A, B, C):
        with manager.lease(preset, "text2img"):
            pass
    sources = {r.source for r in manager.status().models}
    assert sources == {"repo/b", "repo/c"}  # A was offloaded, then dropped when B was offloaded too
    assert manager.status().ram_used <= PIPELINE
    with manager.lease(A, "text2img"):  # A is loaded again from its source
        pass
    assert factory.loads.count(("repo/a", "unet")) == 2


def test_cpu_is_one_tier_where_eviction_drops():
    manager = ModelManager(FakeFactory(), torch.device("cpu"), torch.float32, device_budget=PIPELINE)
    with manager.lease(A, "text2img"):
        pass
    with manager.lease(B, "text2img"):
        pass
    assert {r.source for r in manager.status().models} == {"repo/b"}
    assert manager.status().ram_budget is None


def test_a_failed_load_leaves_the_manager_as_it_was():
    factory = FakeFactory(fail_on={("repo/b", "vae")})
    manager = gpu_manager(factory)
    with manager.lease(A, "text2img"):
        pass
    before = manager.status()
    with pytest.raises(ModelUnavailable):
        with manager.lease(B, "text2img"):
            pass
    after = manager.status()
    assert after.models == before.models and after.reserved == 0
    assert manager.device_lock.acquire(blocking=False)  # the device lock was released
    manager.device_lock.release()
    factory.fail_on.clear()
    with manager.lease(B, "text2img") as lease:
        assert lease.pipeline["vae"].on == "cuda"


def test_the_device_lock_serialises_leases_across_threads():
    manager = gpu_manager()
    inside = []

    def use(preset):
        with manager.lease(preset, "text2img"):
            inside.append(("enter", preset.name))
            time.sleep(0.05)
            inside.append(("exit", preset.name))

    threads = [threading.Thread(target=use, args=(preset,)) for preset in (A, B, C)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # enter/exit strictly alternate: no two leases overlapped
    assert [kind for kind, _ in inside] == ["enter", "exit"] * 3


def test_status_answers_while_a_lease_is_held():
    manager = gpu_manager()
    with manager.lease(A, "text2img"):
        result = []
        thread = threading.Thread(target=lambda: result.append(manager.status()))
        thread.start()
        thread.join(timeout=2)
        assert result and result[0].device_used == PIPELINE
    summary = manager.status().summary()
    assert "cuda" in summary and "a 130.0 KiB" in summary


def test_preloaded_models_are_pinned():
    manager = gpu_manager(device_budget=PIPELINE + 10 * KB)
    manager.preload(A, "text2img")
    with pytest.raises(OutOfMemoryBudget):
        with manager.lease(B, "text2img"):
            pass
    where = placements(manager)
    assert {where[("repo/a", role)] for role in ("unet", "vae", "text_encoder")} == {DEVICE}


def test_working_memory_estimate_grows_with_area_batch_and_dtype():
    small = estimate_working_memory(512, 512, 1, torch.float16)
    assert estimate_working_memory(1024, 1024, 1, torch.float16) == pytest.approx(4 * small, rel=0.01)
    assert estimate_working_memory(512, 512, 2, torch.float16) == pytest.approx(2 * small, rel=0.01)
    assert estimate_working_memory(512, 512, 1, torch.float32) == pytest.approx(2 * small, rel=0.01)
    assert 0.5e9 < small < 2e9  # SD 1.5 at 512 px in fp16 needs about a gigabyte for the VAE decode

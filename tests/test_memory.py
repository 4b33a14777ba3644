"""The memory manager with real torch modules: bytes are measured from the live modules, not from its books."""

import gc
import threading
import time
import weakref

import pytest
import torch

from studio.core.errors import ModelUnavailable, OutOfMemoryBudget
from studio.core.fair_lock import FairLock
from studio.core.memory import ModelManager
from studio.core.model_records import DEVICE, RAM, ModelKey, Patch

KB = 1024
SIZES = {"unet": 100 * KB, "vae": 20 * KB, "text_encoder": 10 * KB}  # SD's proportions
PIPELINE = 130 * KB


class Block(torch.nn.Module):
    """A real module of a chosen size, in a few children, so that a move can fail half way."""

    def __init__(self, size_bytes: int):
        super().__init__()
        self.parts = torch.nn.ModuleList(Part(size_bytes // 4 // 4) for _ in range(4))


class Part(torch.nn.Module):
    fail_moves = 0  # set on an instance: its next moves raise, as a CUDA out-of-memory half way through would

    def __init__(self, count: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(count))

    def _apply(self, fn, recurse=True):
        if self.fail_moves:
            self.fail_moves -= 1
            raise torch.OutOfMemoryError("injected: out of memory half way through the move")
        return super()._apply(fn, recurse)


class TrackingLoader:
    """Builds real modules and measures, at every load, the bytes of every module still alive."""

    def __init__(self, budget: int | None = None, fail_on: set | None = None):
        self.budget = budget
        self.fail_on = fail_on or set()
        self.loads: list[ModelKey] = []
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0

    def live_bytes(self) -> int:
        gc.collect()
        return sum(p.numel() * p.element_size() for module in self.alive for p in module.parameters())

    def size(self, key, dtype):
        return 0 if key.part == "tokenizer" else SIZES[key.part]

    def load(self, key, dtype):
        if key in self.fail_on:
            raise ModelUnavailable(f"cannot load {key}")
        self.loads.append(key)
        if key.part == "tokenizer":
            return "a tokenizer"
        # The moment of risk: everything alive plus what is about to be made must fit the budget.
        self.peak = max(self.peak, self.live_bytes() + SIZES[key.part])
        if self.budget is not None:
            assert self.peak <= self.budget, f"{self.peak} bytes alive while loading {key} (budget {self.budget})"
        module = Block(SIZES[key.part])
        self.alive.add(module)
        return module


def keys(source, task="text2img", inpaint_source=None):
    parts = {role: ModelKey("test", source, role) for role in (*SIZES, "tokenizer")}
    if task == "inpaint" and inpaint_source:
        parts["unet"] = ModelKey("test", inpaint_source, "unet")
    return parts


A, B, C = keys("repo/a"), keys("repo/b"), keys("repo/c")
A_INPAINT = keys("repo/a", "inpaint", inpaint_source="repo/a-inpaint")


def cpu_manager(loader, budget):
    return ModelManager({"test": loader}, "cpu", torch.float32, device_budget=budget)


def two_tier_manager(loader, device_budget=1000 * KB, ram_budget=None, device="cpu"):
    """Two tiers on this GPU-less machine: real .to() calls between 'the device' and the CPU."""
    return ModelManager({"test": loader}, device, torch.float32, device_budget=device_budget, ram_budget=ram_budget,
                        two_tiers=True)


def placements(manager):
    return {(r.source, r.component): r.placement for r in manager.status().models}


# ----- the budget, measured on live modules -----

def test_bytes_alive_never_exceed_the_budget_over_leases_across_tabs():
    loader = TrackingLoader(budget=PIPELINE)
    manager = cpu_manager(loader, PIPELINE)
    for stage in (A, B, A_INPAINT, C, A, B):  # text to image, another preset, inpaint, ...
        with manager.use(stage) as models:
            assert loader.live_bytes() <= PIPELINE
            assert models["unet"] is manager.loaded_object(stage["unet"])
        del models  # a caller that kept a stage's models after the stage would keep them alive
    assert loader.peak <= PIPELINE
    assert manager.status().peak <= PIPELINE
    assert loader.loads.count(A["unet"]) == 2  # the budget holds one pipeline: A's UNet was really reloaded


def test_loading_before_evicting_would_have_exceeded_the_budget():
    """A manager that learns sizes only by loading (the old order: load, then evict) goes over the budget, and
    the measurement sees it: the check above can fail."""
    loader = TrackingLoader()
    manager = cpu_manager(loader, PIPELINE)
    manager._size_of = lambda key, storage=None: 0  # sizes unknown before loading: room is made after each load
    for stage in (A, B):
        with manager.use(stage):
            pass
    assert manager.status().device_used <= PIPELINE  # the books end within the budget ...
    assert loader.peak > PIPELINE  # ... but for a moment two UNets were alive


def test_tasks_on_one_base_share_every_module():
    manager = cpu_manager(TrackingLoader(), 1000 * KB)
    with manager.use(A) as text2img:
        pass
    with manager.use(keys("repo/a", "inpaint")) as inpaint:
        pass
    for role in ("unet", "vae", "text_encoder", "tokenizer"):
        assert inpaint[role] is text2img[role]
    assert manager.status().device_used == PIPELINE


def test_dedicated_inpaint_checkpoint_shares_vae_and_text_encoder():
    loader = TrackingLoader()
    manager = cpu_manager(loader, 1000 * KB)
    with manager.use(A) as text2img:
        pass
    with manager.use(A_INPAINT) as inpaint:
        pass
    assert inpaint["vae"] is text2img["vae"] and inpaint["text_encoder"] is text2img["text_encoder"]
    assert inpaint["unet"] is not text2img["unet"]
    assert loader.loads.count(ModelKey("test", "repo/a", "vae")) == 1
    assert manager.status().device_used == PIPELINE + 100 * KB


def test_a_stage_holds_only_its_own_models():
    """Per-stage placement: the UNet stage may push the idle text encoder out; the encoder comes back later."""
    loader = TrackingLoader(budget=110 * KB + 20 * KB)
    manager = cpu_manager(loader, 130 * KB)
    encode = {"text_encoder": A["text_encoder"], "tokenizer": A["tokenizer"]}
    denoise = {"unet": A["unet"], "vae": A["vae"]}
    with manager.use(encode):
        pass
    with manager.use(denoise, working_memory=10 * KB):  # 100 + 20 + 10 reserved: the encoder must leave
        assert not manager.is_loaded(A["text_encoder"])
    with manager.use(encode):
        assert manager.is_loaded(A["unet"])  # 100 + 10 fits: nothing else had to go


def test_working_memory_reserve_counts_against_the_budget():
    manager = cpu_manager(TrackingLoader(), 2 * PIPELINE)
    with manager.use(A):
        pass
    with manager.use(B, working_memory=PIPELINE):  # A must leave to make room for the reserve
        assert manager.status().reserved == PIPELINE
    assert not manager.is_loaded(A["unet"])
    assert manager.status().reserved == 0


def test_a_stage_refused_for_lack_of_room_reserves_nothing():
    """A refused stage (the decode's untiled try, before its tiled retry) must give back nothing it did not take:
    a count that drifted below zero would let later stages go over the budget."""
    manager = cpu_manager(TrackingLoader(), PIPELINE + 10 * KB)
    for _ in range(3):
        with pytest.raises(OutOfMemoryBudget):
            with manager.use(A, working_memory=100 * KB):
                pass
        assert manager.status().reserved == 0
    with manager.use(A, working_memory=10 * KB):
        assert manager.status().reserved == 10 * KB
    with pytest.raises(OutOfMemoryBudget):  # and the budget still holds
        with manager.use(A, working_memory=11 * KB):
            pass


def test_leased_modules_are_never_evicted():
    manager = cpu_manager(TrackingLoader(), PIPELINE + 50 * KB)
    with manager.use(A) as outer:
        thread_error = []
        # Another stage in the same thread (re-entrant lock) cannot take A's place while A is in use.
        with pytest.raises(OutOfMemoryBudget, match="Not enough device memory"):
            with manager.use(B):
                pass
        assert manager.loaded_object(A["unet"]) is outer["unet"]
        assert not thread_error
    with manager.use(B):  # once released, A makes way
        pass
    assert not manager.is_loaded(A["unet"])


# ----- failures roll back -----

def test_a_short_size_estimate_still_keeps_the_device_within_budget():
    """Two tiers: a model bigger than its files said is moved to the device only once room for its real size
    is made."""
    class ShortEstimates(TrackingLoader):
        def size(self, key, dtype):
            return super().size(key, dtype) // 2

    manager = two_tier_manager(ShortEstimates(), device_budget=PIPELINE + 20 * KB)
    for stage in (A, B, A):
        with manager.use(stage):
            assert manager.status().device_used <= manager.device_budget
    assert manager.status().peak <= manager.device_budget


def test_a_stage_that_cannot_fit_evicts_nothing():
    """Refused before evicting: the idle models it could not have used stay where they are."""
    manager = two_tier_manager(TrackingLoader(), device_budget=3 * PIPELINE)
    for stage in (A, B):
        with manager.use(stage):
            pass
    with pytest.raises(OutOfMemoryBudget):
        with manager.use(C, working_memory=10 * PIPELINE):
            pass
    assert {placements(manager)[(source, "unet")] for source in ("repo/a", "repo/b")} == {DEVICE}


def test_a_failed_load_leaves_the_manager_as_it_was():
    loader = TrackingLoader(fail_on={B["vae"]})
    manager = cpu_manager(loader, 1000 * KB)
    with manager.use(A):
        pass
    before = manager.status()
    with pytest.raises(ModelUnavailable):
        with manager.use(B):
            pass
    after = manager.status()
    assert after.models == before.models and after.reserved == 0
    assert manager.device_lock.acquire(blocking=False)  # the device lock was released
    manager.device_lock.release()
    assert loader.live_bytes() == PIPELINE  # B's unet, loaded before its vae failed, was let go
    loader.fail_on.clear()
    with manager.use(B) as models:
        assert isinstance(models["vae"], Block)


def test_a_move_that_fails_half_way_is_rolled_back():
    loader = TrackingLoader()
    manager = two_tier_manager(loader)
    with manager.use(A):
        pass
    manager.offload_idle()
    unet = manager.loaded_object(A["unet"])
    unet.parts[2].fail_moves = 1  # parts 0 and 1 move, then part 2 runs out of memory
    with pytest.raises(torch.OutOfMemoryError):
        with manager.use(A):
            pass
    assert placements(manager)[("repo/a", "unet")] == RAM and manager.status().reserved == 0
    with manager.use(A):  # and it works next time
        assert placements(manager)[("repo/a", "unet")] == DEVICE


def test_a_half_moved_model_that_cannot_be_moved_back_is_dropped_not_recorded():
    """On the meta device, moved tensors cannot come back: the model is in no known state, so it is dropped
    rather than recorded in RAM with half its tensors elsewhere."""
    loader = TrackingLoader()
    manager = two_tier_manager(loader, device="meta")
    manager.use  # noqa: B018
    with manager.device_lock:
        entries, _ = manager._place([A["unet"]], 0, on_device=False)
        manager._unlock(entries.values())
    manager.loaded_object(A["unet"]).parts[2].fail_moves = 1
    with pytest.raises(torch.OutOfMemoryError):
        with manager.use({"unet": A["unet"]}):
            pass
    for record in manager.status().models:
        module = manager.loaded_object(ModelKey("test", record.source, record.component))
        devices = {p.device.type for p in module.parameters()}
        assert devices == ({"meta"} if record.placement == DEVICE else {"cpu"})
    assert not manager.is_loaded(A["unet"])


# ----- two tiers (a GPU and host RAM), with real .to() calls -----

def test_least_recently_used_leaves_the_device_first():
    manager = two_tier_manager(TrackingLoader(), device_budget=2 * PIPELINE + 10 * KB)
    for stage in (A, B, A, C):  # A is more recent than B when C comes
        with manager.use(stage):
            pass
    where = placements(manager)
    # C needs 130 KB and 10 KB are free: B's unet (100 KB) and vae (20 KB) go, B's text encoder may stay.
    assert where[("repo/b", "unet")] == RAM and where[("repo/b", "vae")] == RAM
    assert where[("repo/b", "text_encoder")] == DEVICE
    assert {where[("repo/a", role)] for role in SIZES} == {where[("repo/c", role)] for role in SIZES} == {DEVICE}
    assert manager.status().peak <= manager.device_budget


def test_ram_budget_drops_least_recently_used_offloaded_models():
    loader = TrackingLoader()
    manager = two_tier_manager(loader, device_budget=PIPELINE, ram_budget=PIPELINE)
    for stage in (A, B, C):
        with manager.use(stage):
            pass
    assert {r.source for r in manager.status().models} == {"repo/b", "repo/c"}
    assert manager.status().ram_used <= PIPELINE
    assert loader.live_bytes() == 2 * PIPELINE  # A really left memory
    with manager.use(A):
        pass
    assert loader.loads.count(A["unet"]) == 2


def test_pinned_preloads_stay_and_plain_preloads_make_way():
    pinned = two_tier_manager(TrackingLoader(), device_budget=PIPELINE + 10 * KB)
    pinned.preload(A, pin=True)  # ZeroGPU
    with pytest.raises(OutOfMemoryBudget):
        with pinned.use(B):
            pass
    assert {placements(pinned)[("repo/a", role)] for role in SIZES} == {DEVICE}
    warmed = two_tier_manager(TrackingLoader(), device_budget=PIPELINE + 10 * KB)
    warmed.preload(A)  # --preload on an ordinary GPU: warm, not a permanent claim
    with warmed.use(B):
        pass
    assert placements(warmed)[("repo/a", "unet")] == RAM


def test_the_device_reports_less_free_than_the_budget():
    """Other processes on the GPU: the driver's free memory (plus torch's cached blocks) caps the plan."""
    physical = PIPELINE + 20 * KB  # all that is free on the card; other processes hold the rest
    manager = ModelManager({"test": TrackingLoader()}, "cpu", torch.float32, device_budget=10 * PIPELINE,
                           two_tiers=True, free_memory=lambda: physical - manager.status().device_used)
    with manager.use(A):
        pass
    with manager.use(B):  # A is offloaded first, though the budget alone would have held both
        pass
    assert placements(manager)[("repo/a", "unet")] == RAM


def test_frozen_manager_refuses_to_load():
    """ZeroGPU's worker: everything was preloaded in the main process; a load there would be lost."""
    manager = ModelManager({"test": TrackingLoader()}, "cpu", torch.float32, device_budget=10 * PIPELINE,
                           loading_allowed=False)
    with pytest.raises(ModelUnavailable, match="may not load models"):
        with manager.use(A):
            pass
    assert manager.loads == 0


# ----- the device lock: serialises, and grants turns in arrival order -----

def test_the_device_lock_serialises_stages_across_threads():
    manager = cpu_manager(TrackingLoader(), 1000 * KB)
    inside = []

    def use(stage, name):
        with manager.use(stage):
            inside.append(("enter", name))
            time.sleep(0.05)
            inside.append(("exit", name))

    threads = [threading.Thread(target=use, args=(stage, name)) for stage, name in ((A, "a"), (B, "b"), (C, "c"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [kind for kind, _ in inside] == ["enter", "exit"] * 3


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_fair_lock_grants_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    waiting = []
    for count, name in enumerate("xyz", start=1):
        thread = threading.Thread(target=lambda n=name: (lock.acquire(), order.append(n), lock.release()))
        thread.start()
        waiting.append(thread)
        wait_until(lambda c=count: len(lock._waiting) == c)  # x is queued before y arrives, y before z
    lock.release()
    for thread in waiting:
        thread.join(timeout=5)
    assert order == ["x", "y", "z"]


def test_a_job_that_asks_again_queues_behind_the_one_waiting():
    """A long job releasing the lock between images cannot grab it straight back: the waiting job goes first."""
    lock, order = FairLock(), []
    started = threading.Event()

    def long_job():
        for image in range(3):
            with lock:
                order.append(f"long {image}")
                started.set()
                if image == 0:
                    wait_until(lambda: len(lock._waiting) == 1)  # the quick job is queued during image 0

    def quick_job():
        started.wait()
        with lock:
            order.append("quick")

    threads = [threading.Thread(target=long_job), threading.Thread(target=quick_job)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order.index("quick") == 1


def test_status_answers_while_a_stage_runs():
    manager = two_tier_manager(TrackingLoader())
    with manager.use(A):
        result = []
        thread = threading.Thread(target=lambda: result.append(manager.status()))
        thread.start()
        thread.join(timeout=2)
        assert result and result[0].device_used == PIPELINE
    assert "a 130.0 KiB" in manager.status().summary()


# ----- patches: a job's changes to shared models (its LoRAs) -----

class Counting:
    """A patch that adds a marker to the model and counts what the manager asks of it."""

    def __init__(self, name: str, size: int = 4 * KB, fail_remove: bool = False):
        self.name, self.applied, self.removed, self.fail_remove = name, 0, 0, fail_remove
        self.patch = Patch(identity=("test", name), apply=self.apply, remove=self.remove, size=size)

    def apply(self, model, lease):
        self.applied += 1
        model.marker = self.name

    def remove(self, model):
        if self.fail_remove:
            raise RuntimeError("injected: the patch cannot be removed")
        self.removed += 1
        del model.marker


def test_a_patch_stays_across_one_jobs_turns_and_leaves_before_another_jobs_turn():
    manager = cpu_manager(TrackingLoader(), 10 * PIPELINE)
    lora = Counting("lora")
    job, other = object(), object()
    for _ in range(3):  # three images of one job: applied once
        with manager.turn(owner=job), manager.use({"unet": A["unet"]}, patches={"unet": lora.patch}) as models:
            assert models["unet"].marker == "lora"
    assert (lora.applied, lora.removed) == (1, 0)
    assert manager.carries(A["unet"], lora.patch.identity)
    assert manager.status().device_used == SIZES["unet"] + 4 * KB  # the patch's bytes are on the books
    with manager.turn(owner=other):  # another job's turn: the model is as it was loaded before it starts
        assert lora.removed == 1 and not hasattr(manager.loaded_object(A["unet"]), "marker")
        with manager.use({"unet": A["unet"]}) as models:
            assert not hasattr(models["unet"], "marker")
    assert manager.status().device_used == SIZES["unet"]
    with manager.turn(owner=job), manager.use({"unet": A["unet"]}, patches={"unet": lora.patch}):
        pass
    assert lora.applied == 2  # the first job again: applied again


def test_a_lease_without_the_patch_or_with_another_gets_its_own():
    manager = cpu_manager(TrackingLoader(), 10 * PIPELINE)
    first, second = Counting("first"), Counting("second")
    with manager.use({"unet": A["unet"]}, patches={"unet": first.patch}):
        pass
    with manager.use({"unet": A["unet"]}, patches={"unet": second.patch}) as models:  # no turn: still switched
        assert models["unet"].marker == "second" and first.removed == 1
    with manager.use({"unet": A["unet"], "vae": A["vae"]}) as models:
        assert not hasattr(models["unet"], "marker") and second.removed == 1


def test_a_patch_that_cannot_be_removed_unloads_its_model():
    manager = cpu_manager(TrackingLoader(), 10 * PIPELINE)
    stuck = Counting("stuck", fail_remove=True)
    with manager.use({"unet": A["unet"]}, patches={"unet": stuck.patch}):
        pass
    with pytest.raises(RuntimeError, match="cannot be removed"):
        manager.remove_patches()
    assert not manager.is_loaded(A["unet"])  # loaded again, clean, when next asked for
    with manager.use({"unet": A["unet"]}) as models:
        assert not hasattr(models["unet"], "marker")


class Keeping:
    """A patch as a merged LoRA is: it changes a layer's weights in place and keeps a copy of them in host RAM
    (`held`), to put them back bit for bit."""

    def __init__(self, name: str = "keeping"):
        self.kept: dict[str, torch.Tensor] = {}
        self.patch = Patch(identity=("keeping", name), apply=self.apply, remove=self.remove,
                           held=lambda: sum(t.numel() * t.element_size() for t in self.kept.values()),
                           held_bound=lambda model, lease: model.parts[0].weight.numel() * 4)

    def apply(self, model, lease):
        weight = model.parts[0].weight
        self.kept["parts.0"] = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.add_(1)

    def remove(self, model):
        with torch.no_grad():
            model.parts[0].weight.copy_(self.kept.pop("parts.0"))


class Adding:
    """A patch that leaves layers on the model (LoRA adapters PEFT could not merge): an extra parameter."""

    def __init__(self, count: int):
        self.patch = Patch(identity=("adding", count), apply=lambda model, lease: model.register_parameter(
            "adapter", torch.nn.Parameter(torch.zeros(count))), remove=lambda model: delattr(model, "adapter"))


def test_what_a_patch_keeps_in_ram_is_on_the_books_and_makes_room_there():
    """Two tiers: the kept copies count against RAM's budget while the patch is on; an idle model in RAM goes to
    make room for them; none are counted once the patch is off."""
    kept = SIZES["unet"] // 4  # one of the UNet's four parts
    manager = two_tier_manager(TrackingLoader(), ram_budget=SIZES["unet"] + kept + SIZES["vae"] - KB)
    with manager.use({"vae": A["vae"]}):
        pass
    manager.offload_idle()  # the VAE waits in RAM
    assert placements(manager)[(A["vae"].source, "vae")] == RAM
    keeping = Keeping()
    with manager.use({"unet": A["unet"]}, patches={"unet": keeping.patch}):
        assert manager.status().ram_used == SIZES["vae"] + kept
    manager.offload_idle()  # the patched UNet to RAM: its bytes and the kept copy would pass the budget ...
    status = manager.status()
    assert status.ram_used <= manager.ram_budget and not manager.is_loaded(A["vae"])  # ... so the VAE left
    assert status.ram_used == SIZES["unet"] + kept
    manager.remove_patches()
    assert manager.status().ram_used == SIZES["unet"] and not keeping.kept


def test_room_for_what_a_patch_keeps_is_made_in_ram_while_its_model_is_on_the_device():
    kept = SIZES["unet"] // 4
    manager = two_tier_manager(TrackingLoader(), ram_budget=SIZES["vae"] + kept - KB)
    with manager.use({"vae": A["vae"]}):
        pass
    manager.offload_idle()  # the VAE waits in RAM, where the kept copy will not fit beside it
    with manager.use({"unet": A["unet"]}, patches={"unet": Keeping().patch}):
        assert not manager.is_loaded(A["vae"]) and manager.status().ram_used == kept


def test_a_patch_there_is_no_room_for_is_taken_off_and_never_passes_the_budget():
    """One tier: the kept copy does not fit beside the UNet. The lease is refused before anything changes, the
    model stays as loaded, and asking again refuses again rather than going over the budget."""
    manager = cpu_manager(TrackingLoader(), SIZES["unet"] + SIZES["unet"] // 8)
    keeping = Keeping()
    for _ in range(2):
        with pytest.raises(OutOfMemoryBudget):
            with manager.use({"unet": A["unet"]}, patches={"unet": keeping.patch}):
                pass
        assert not manager.carries(A["unet"], keeping.patch.identity) and not keeping.kept
        assert manager.loaded_object(A["unet"]).parts[0].weight[0] == 1
        status = manager.status()
        assert status.device_used == SIZES["unet"] and status.peak <= manager.device_budget


def test_on_the_cpu_what_a_patch_keeps_counts_against_the_device_budget():
    """One tier: the kept copies are in the same memory as the models; an idle model is dropped for them rather
    than the budget passed."""
    kept = SIZES["unet"] // 4
    manager = cpu_manager(TrackingLoader(), SIZES["unet"] + kept + SIZES["text_encoder"] + KB)
    with manager.use({"vae": A["vae"]}):  # used first: the least recently used
        pass
    with manager.use({"text_encoder": A["text_encoder"]}):
        pass
    keeping = Keeping()
    with manager.use({"unet": A["unet"]}, patches={"unet": keeping.patch}) as models:
        assert manager.status().device_used == SIZES["unet"] + kept + SIZES["text_encoder"]
        assert not manager.is_loaded(A["vae"])  # the least recently used idle model made the room
        assert models["unet"].parts[0].weight[0] == 2
    manager.remove_patches()
    assert manager.status().device_used == SIZES["unet"] + SIZES["text_encoder"]
    assert manager.loaded_object(A["unet"]).parts[0].weight[0] == 1  # put back
    assert manager.status().peak <= manager.device_budget  # room was made before the copy, not after


def test_layers_a_patch_adds_are_measured_not_declared_and_made_room_for():
    manager = cpu_manager(TrackingLoader(), 10 * PIPELINE)
    adding = Adding(count=1000)
    with manager.use({"unet": A["unet"]}, patches={"unet": adding.patch}):
        assert manager.status().device_used == SIZES["unet"] + 4000  # 1000 float32 the patch never declared
    manager.remove_patches()
    assert manager.status().device_used == SIZES["unet"]
    # two tiers: the layers left on the model on the device push an idle model off it
    manager = two_tier_manager(TrackingLoader(), device_budget=SIZES["unet"] + SIZES["vae"] + 10 * KB)
    with manager.use({"vae": A["vae"]}):
        pass
    with manager.use({"unet": A["unet"]}, patches={"unet": Adding(count=5000).patch}):
        assert placements(manager)[(A["vae"].source, "vae")] == RAM
        assert manager.status().device_used == SIZES["unet"] + 20000 <= manager.device_budget


# ----- the records are the truth: what a lease's code does to a model is put back -----

def test_a_model_cast_behind_the_records_is_cast_back_when_its_lease_ends():
    """diffusers' SDXL img2img casts its VAE to the pipeline's dtype after encoding the init image."""
    manager = cpu_manager(TrackingLoader(), 10 * PIPELINE)
    with manager.use({"vae": A["vae"]}) as models:
        models["vae"].to(dtype=torch.float16)
    assert {p.dtype for p in manager.loaded_object(A["vae"]).parameters()} == {torch.float32}
    assert manager.status().device_used == SIZES["vae"]


class LoaderInItsDtype(TrackingLoader):
    """Loads in the dtype the manager asks for, as the diffusers loaders do."""

    def size(self, key, dtype):
        return super().size(key, dtype) * torch.finfo(dtype).bits // 32

    def load(self, key, dtype):
        return super().load(key, dtype).to(dtype=dtype)


def test_a_lease_may_cast_a_model_for_its_stage_and_the_records_say_so():
    """SDXL's own VAE decodes in float32 when the studio runs in float16: cast for the stage, recorded, and back."""
    manager = ModelManager({"test": LoaderInItsDtype()}, "cpu", torch.float16, device_budget=10 * PIPELINE)
    with manager.use({"vae": A["vae"]}):
        pass
    with manager.use({"vae": A["vae"]}, dtypes={"vae": torch.float32}) as models:
        assert {p.dtype for p in models["vae"].parameters()} == {torch.float32}
        assert [(r.dtype, r.size) for r in manager.status().models] == [("float32", SIZES["vae"])]
    assert {p.dtype for p in manager.loaded_object(A["vae"]).parameters()} == {torch.float16}
    assert [(r.dtype, r.size) for r in manager.status().models] == [("float16", SIZES["vae"] // 2)]


def test_a_model_its_loader_keeps_in_float32_stays_so_under_float16():
    """Face restorers and Inception keep float32 whatever the manager's dtype: recorded as loaded, never cast."""
    manager = ModelManager({"test": TrackingLoader()}, "cpu", torch.float16, device_budget=10 * PIPELINE)
    for _ in range(2):
        with manager.use({"vae": A["vae"]}) as models:  # TrackingLoader builds float32 modules
            assert {p.dtype for p in models["vae"].parameters()} == {torch.float32}
    assert [r.dtype for r in manager.status().models] == ["float32"]


def test_model_offload_hooks_the_models_but_never_a_pinned_one():
    pytest.importorskip("accelerate")
    manager = two_tier_manager(TrackingLoader(), device_budget=10 * PIPELINE)
    manager.preload({"text_encoder": A["text_encoder"]}, pin=True)
    keys = {"text_encoder": A["text_encoder"], "unet": A["unet"]}
    with manager.model_offload(keys) as models:
        assert not hasattr(models["text_encoder"], "_hf_hook")  # pinned: it stays where it is, unhooked
        assert hasattr(models["unet"], "_hf_hook")
    assert not hasattr(manager.loaded_object(A["unet"]), "_hf_hook")  # the hooks go with the lease
    assert placements(manager)[("repo/a", "text_encoder")] == DEVICE

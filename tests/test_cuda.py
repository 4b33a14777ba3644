"""The engine on a real CUDA GPU, in fp16 as a GPU server runs it: the embedded model through the studio's factory.
Skipped without CUDA, in CI too (tests/accelerators.py). bench/gpu_check.py does the same for SD 1.5 and SDXL at their
real sizes, with the memory and speed figures."""

import functools
import gc

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.core.devices import free_device_bytes
from studio.core.errors import OutOfMemoryBudget
from studio.core.model_records import DEVICE, ModelKey
from studio.models.families import family_of
from studio.models.loras import LoraCatalog
from studio.models.presets import load_presets
from studio.tasks.engines import ManagerSettings, build_engines, build_manager
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest

pytestmark = pytest.mark.cuda
MIB, GIB = 1024**2, 1024**3
REQUEST = TextToImageRequest(prompt="a red circle on a blue background", steps=8, seed=3, guidance_scale=3.0)


def cuda_engines(device_budget: int):
    """The engines as app.py builds them for a GPU: its free-memory report, the device's dtype (fp16)."""
    presets = load_presets()
    settings = ManagerSettings(device="cuda", device_budget=device_budget,
                               free_memory=functools.partial(free_device_bytes, torch.device("cuda")))
    manager, models = build_manager(presets, settings)
    return build_engines(manager, models, presets, loras=LoraCatalog({}), version="Diffusion Studio CUDA test")


def free_cuda():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def engines():
    made = cuda_engines(4 * GIB)
    yield made
    del made
    free_cuda()


def placement_mismatches(manager) -> list[str]:
    """Every model the manager records whose tensors are not all where its record says."""
    wrong = []
    for record in manager.status().models:
        module = manager.loaded_object(ModelKey(record.kind, record.source, record.component))
        expected = "cuda" if record.placement == DEVICE else "cpu"
        found = {tensor.device.type for tensor in [*module.parameters(), *module.buffers()]}
        if found != {expected}:
            wrong.append(f"{record.component}: recorded {record.placement}, on {sorted(found)}")
    return wrong


def test_text_to_image_runs_in_fp16_on_cuda_through_the_factory(engines):
    result = engines.text_to_image.generate(REQUEST)  # NaN latents or pixels would raise NumericalError
    pixels = np.asarray(result.images[0].image)
    assert result.images[0].image.size == (64, 64) and pixels.std() > 1  # an image, not a flat fill
    preset = engines.text_to_image.presets.get("embedded")
    unet = engines.manager.loaded_object(engines.models.keys(preset, "text2img")["unet"])
    assert engines.manager.dtype == torch.float16
    assert next(unet.parameters()).device.type == "cuda" and next(unet.parameters()).dtype == torch.float16


def test_the_managers_records_match_what_cuda_holds(engines):
    engines.text_to_image.generate(REQUEST)
    torch.cuda.synchronize()
    status = engines.manager.status()
    assert status.reserved == 0 and not any(record.in_use for record in status.models)
    assert {record.placement for record in status.models} == {DEVICE}  # 4 GiB hold the embedded model whole
    assert placement_mismatches(engines.manager) == []
    allocated = torch.cuda.memory_allocated()
    # what CUDA holds besides the models: nothing of the finished job; cuBLAS's workspaces, the allocator's rounding
    assert status.device_used <= allocated <= status.device_used + 256 * MIB, (status.device_used, allocated)


def test_a_tiny_budget_ends_the_fallbacks_in_a_clear_out_of_memory_budget():
    """Every stage reserves at least CUDA's floor (1.2 GiB): under 256 MiB the encode stage tries each fallback,
    model CPU offload last, and the job ends with the studio's message, nothing left reserved or locked."""
    small = cuda_engines(256 * MIB)
    try:
        with pytest.raises(OutOfMemoryBudget, match="even with model CPU offload"):
            small.text_to_image.generate(REQUEST)
        status = small.manager.status()
        assert status.reserved == 0 and not any(record.in_use for record in status.models)
        assert status.device_used <= 256 * MIB
    finally:
        del small
        free_cuda()


def test_model_cpu_offload_leaves_every_model_where_the_manager_records_it():
    """Inpaint (its denoise stage holds the UNet and the VAE) with the text encoder pinned and a budget that holds
    the UNet and the stage's working memory but not the VAE besides: the denoise stage runs under accelerate's model
    CPU offload; afterwards each model is where the manager says, with no hook left on it."""
    sizing = cuda_engines(4 * GIB)
    preset = sizing.text_to_image.presets.get("embedded")
    keys = sizing.models.keys(preset, "inpaint")
    size = {role: sizing.manager.loaders[key.kind].size(key, sizing.manager.dtype) for role, key in keys.items()}
    working = sizing.stages.plan_denoise(preset, "inpaint", 64, 64, True, tiled=True).working_memory
    encoders = family_of(preset).text_encoders
    budget = sum(size[role] for role in encoders) + size["unet"] + working + size["vae"] // 2
    engines = cuda_engines(budget)
    offloaded = []
    run_offloaded = engines.stages._run_offloaded

    def noting(plan, work):
        offloaded.append(plan.stage)
        return run_offloaded(plan, work)

    engines.stages._run_offloaded = noting
    try:
        engines.manager.preload({role: keys[role] for role in encoders}, pin=True)
        image = Image.new("RGB", (64, 64), (40, 60, 200))
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
        result = engines.inpainter.inpaint(image, mask, InpaintRequest(prompt="a red circle", steps=6, seed=5))
        assert len(result.images) == 1 and offloaded == ["denoise"]
        assert placement_mismatches(engines.manager) == []
        for record in engines.manager.status().models:
            module = engines.manager.loaded_object(ModelKey(record.kind, record.source, record.component))
            assert not hasattr(module, "_hf_hook"), record.component
        assert engines.manager.status().reserved == 0
    finally:
        del engines, sizing
        free_cuda()

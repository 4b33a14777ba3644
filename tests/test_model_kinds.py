"""Other kinds of model in the same manager as the diffusers components: one budget, one lock, shared by key."""

import torch
from tiny_models import ROOT

from studio.core.memory import ModelManager
from studio.core.model_records import ModelKey
from studio.evaluation.model_kinds import CLIP, ClipLoader, clip_key
from studio.models.components import DiffusersModels
from studio.models.loading import DiffusersLoader
from studio.models.presets import load_presets
from studio.models.upscalers import UPSCALER, UpscalerLoader, load_upscalers, upscaler_key

MODELS = ROOT / "models"


def manager(budget):
    return ModelManager({"diffusers": DiffusersLoader(), UPSCALER: UpscalerLoader(), CLIP: ClipLoader()}, "cpu",
                        torch.float32, device_budget=budget)


def test_an_upscaler_and_a_clip_scorer_are_held_like_any_model():
    upscaler, clip = upscaler_key(load_upscalers().get("embedded-rrdbnet-x4")), clip_key(MODELS / "embedded-clip")
    sizes = {key: manager(10**9).loaders[key.kind].size(key, torch.float32) for key in (upscaler, clip)}
    shared = manager(10**9)
    with shared.use({"upscaler": upscaler}) as first:
        image = torch.rand(1, 3, 8, 8)
        assert first["upscaler"](image).shape == (1, 3, 32, 32)  # x4
    with shared.use({"upscaler": upscaler, "scorer": clip}) as both:
        assert both["upscaler"] is first["upscaler"]  # one key, one loaded copy
        assert both["scorer"].config.projection_dim > 0
    # sizes told from the headers, before loading, are never short, and close
    assert sum(sizes.values()) - 2 * 64 * 1024 <= shared.status().device_used <= sum(sizes.values())


def test_kinds_make_room_for_each_other_within_one_budget():
    embedded = load_presets().get("embedded")
    unet = DiffusersModels(torch.device("cpu")).keys(embedded, "text2img")["unet"]
    upscaler = upscaler_key(load_upscalers().get("embedded-rrdbnet-x4"))
    probe = manager(10**9)
    unet_bytes = probe.loaders["diffusers"].size(unet, torch.float32)
    upscaler_bytes = probe.loaders[UPSCALER].size(upscaler, torch.float32)
    small = manager(max(unet_bytes, upscaler_bytes) + 1024)  # room for one of them at a time
    with small.use({"unet": unet}):
        pass
    with small.use({"upscaler": upscaler}):
        assert not small.is_loaded(unet)  # the idle UNet made way for the upscaler
    assert small.status().peak <= small.device_budget
    assert ModelKey("diffusers", embedded.source, "unet") == unet

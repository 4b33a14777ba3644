"""ControlNet units: tiny random ControlNets for the embedded model, SD 2.x and SDXL, loaded through the presets
path and leased by the memory manager beside the UNet; weight, guidance range and the three control modes as A1111
computes them; several units; the PNG fields; the checks; the preprocessors."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import (
    EMBEDDED,
    save_random_adapter,
    save_random_controlnet,
    save_random_preprocessor_weights,
    save_random_union,
    save_tiny_sd2,
    save_tiny_sdxl,
)

from studio.a1111.controlnet import ControlNetFields, parse_unit, read_controlnet_fields
from studio.a1111.metadata import parse_parameters
from studio.core.errors import InvalidRequest
from studio.models.controlnets import (
    CONTROLNET,
    CONTROLNET_MORE_IMPORTANT,
    PROMPT_MORE_IMPORTANT,
    ControlClock,
    ControlNetCatalog,
    ControlNetPreset,
    ControlUnits,
    PreprocessorWeights,
    UnitSettings,
    load_controlnets,
    soft_injection_scales,
)
from studio.models.presets import ModelPreset, PresetCatalog, load_presets
from studio.tasks.control import (
    CROP_AND_RESIZE,
    JUST_RESIZE,
    RESIZE_AND_FILL,
    ControlUnit,
    fit_to_size,
    pixel_perfect_resolution,
    preprocessor_weights,
    preprocessors_not_here,
    unit_from_fields,
)
from studio.tasks.engines import local_engines
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest
from studio.tasks.preprocessors import preprocess

PROMPT = "a red circle on a blue background"


def sketch(size: int = 64) -> Image.Image:
    """Black lines on white, as a person draws: a square at the bottom right."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle((size // 2, size // 2, size - 8, size - 8), outline="black", width=3)
    return image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    sd2, sdxl = save_tiny_sd2(root / "tiny-sd2"), save_tiny_sdxl(root / "tiny-sdxl")
    return {"embedded": save_random_controlnet(EMBEDDED, root / "cn-embedded", seed=1),
            "embedded-b": save_random_controlnet(EMBEDDED, root / "cn-embedded-b", seed=2),
            "sd2": sd2, "sdxl": sdxl,
            "cn-sd2": save_random_controlnet(sd2, root / "cn-sd2", seed=3),
            "cn-sdxl": save_random_controlnet(sdxl, root / "cn-sdxl", seed=4),
            "union-sdxl": save_random_union(sdxl, root / "union-sdxl", seed=5),
            "adapter-sdxl": save_random_adapter(sdxl, root / "adapter-sdxl", seed=6),
            "weights": save_random_preprocessor_weights(root / "preprocessor-weights")}


@pytest.fixture(scope="module")
def catalog(folders):
    return ControlNetCatalog([
        ControlNetPreset("embedded-a", "Embedded A", "embedded", local=folders["embedded"], preprocessor="invert"),
        ControlNetPreset("embedded-b", "Embedded B", "embedded", local=folders["embedded-b"]),
        ControlNetPreset("sd2", "Tiny SD 2", "sd21", local=folders["cn-sd2"]),
        ControlNetPreset("sdxl", "Tiny SDXL", "sdxl", local=folders["cn-sdxl"]),
        ControlNetPreset("union", "Tiny Union", "sdxl", kind="controlnet_union", local=folders["union-sdxl"],
                         control_types=(("invert", 2), ("canny", 3), ("depth", 1), ("none", 2))),
        ControlNetPreset("union-as-edges", "Tiny Union, edges", "sdxl", kind="controlnet_union",
                         local=folders["union-sdxl"], control_types=(("invert", 3),)),
        ControlNetPreset("adapter", "Tiny adapter", "sdxl", kind="t2i_adapter", local=folders["adapter-sdxl"]),
        ControlNetPreset("elsewhere", "Not here", "embedded", local=Path("/nonexistent/controlnet")),
    ], {name: PreprocessorWeights(name, ("any",), local=folder) for name, folder in folders["weights"].items()})


@pytest.fixture(scope="module")
def engines(folders, catalog):
    embedded = load_presets().get("embedded")
    tiny = dict(description="tiny", default_width=64, default_height=64, min_size=64, default_steps=4,
                default_scheduler="Euler")
    presets = PresetCatalog([embedded,
                             ModelPreset(name="tiny-sd2", label="Tiny SD 2", family="sd21", local=folders["sd2"], **tiny),
                             ModelPreset(name="tiny-sdxl", label="Tiny SDXL", family="sdxl", local=folders["sdxl"],
                                         **tiny)], "embedded")
    return local_engines(presets, controlnets=catalog)


def request(**fields) -> TextToImageRequest:
    return TextToImageRequest(**{"prompt": PROMPT, "seed": 3, "steps": 6, **fields})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


def test_weight_0_gives_the_plain_image_bit_for_bit_and_weight_1_another(engines):
    engine = engines.text_to_image
    plain = pixels(engine.generate(request()))
    off = engine.generate(request(controls=(ControlUnit("embedded-a", sketch(), "invert", weight=0.0),)))
    on = engine.generate(request(controls=(ControlUnit("embedded-a", sketch(), "invert", weight=1.0),)))
    assert np.array_equal(pixels(off), plain)
    assert np.abs(pixels(on).astype(int) - plain).mean() > 1


def test_the_manager_leases_and_counts_the_controlnet_beside_the_unet(engines, folders):
    engine = engines.text_to_image
    engine.generate(request(controls=(ControlUnit("embedded-a", sketch(), "invert"),)))
    records = [record for record in engines.manager.status().models if record.kind == CONTROLNET]
    weights = Path(folders["embedded"]) / "diffusion_pytorch_model.safetensors"
    assert [record.source for record in records] == [str(folders["embedded"])]
    assert records[0].size == pytest.approx(weights.stat().st_size, rel=0.01)  # float32 on disk and in memory
    assert engines.manager.status().device_used <= engines.manager.device_budget


class Recording(torch.nn.Module):
    """A stand-in ControlNet: residuals of ones (3 down blocks and the middle one), recording the calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        self.calls += 1
        ones = torch.ones(sample.shape[0], 1, 2, 2)
        return [ones.clone() for _ in range(3)], ones.clone()


def run_units(settings: list[UnitSettings], step: int = 0, steps: int = 10, guidance: bool = True):
    nets = [Recording() for _ in settings]
    units = ControlUnits(nets, settings, ControlClock(steps, evaluations=step), guidance)
    sample = torch.zeros(2 if guidance else 1, 4, 2, 2)
    down, middle = units(sample, 1, None, [None] * len(nets), [1.0] * len(nets))
    return down, middle, nets


def test_the_three_control_modes_as_a1111_computes_them():
    down, middle, _ = run_units([UnitSettings(weight=0.5)])  # Balanced: the weight on every output, both halves
    assert all(torch.equal(output, torch.full_like(output, 0.5)) for output in [*down, middle])
    # soft injection: A1111's table for 13 outputs, its first ones for fewer (SDXL's 10: the middle at 0.825**3)
    soft = [0.5 * 0.825**12, 0.5 * 0.825**11, 0.5 * 0.825**10, 0.5 * 0.825**9]
    down, middle, _ = run_units([UnitSettings(weight=0.5, control_mode=PROMPT_MORE_IMPORTANT)])
    assert [float(output.flatten()[0]) for output in [*down, middle]] == pytest.approx(soft)
    assert soft_injection_scales(13, 1.0) == pytest.approx([0.825 ** (12 - i) for i in range(13)])  # SD 1.x
    assert soft_injection_scales(10, 1.0)[-1] == pytest.approx(0.825**3)  # SDXL, as A1111's control_scales[:10]
    # "ControlNet is more important": soft injection, and the negative prompt's half of the batch gets none
    down, middle, _ = run_units([UnitSettings(weight=0.5, control_mode=CONTROLNET_MORE_IMPORTANT)])
    for output, scale in zip([*down, middle], soft):
        assert torch.equal(output[0], torch.zeros_like(output[0]))
        assert float(output[1].flatten()[0]) == pytest.approx(scale)


def test_several_units_add_up_and_a_unit_acts_only_inside_its_range():
    settings = [UnitSettings(weight=1.0), UnitSettings(weight=0.25, guidance_start=0.2, guidance_end=0.5)]
    down, _, nets = run_units(settings, step=1)  # 1/10 is before the second unit's start
    assert float(down[0].flatten()[0]) == 1.0 and nets[1].calls == 0
    down, _, nets = run_units(settings, step=5)  # 5/10 = its end: still acts, as A1111's `<=`
    assert float(down[0].flatten()[0]) == 1.25 and nets[1].calls == 1
    down, middle, nets = run_units([UnitSettings(weight=1.0, guidance_end=0.5)], step=6)
    assert down is None and middle is None and nets[0].calls == 0  # none acts: the UNet gets no residuals


def test_the_guidance_range_is_honoured_step_by_step_in_a_real_pass(engines, monkeypatch):
    """8 Euler steps, start 0.25, end 0.5: the ControlNet runs at steps 2, 3 and 4 (i / 8 within [0.25, 0.5])."""
    import studio.models.controlnets as controlnets

    acting = []
    original = controlnets.UnitSettings.acts_at

    def recording(self, step, steps):
        acts = original(self, step, steps)
        if acts:
            acting.append(step)
        return acts

    monkeypatch.setattr(controlnets.UnitSettings, "acts_at", recording)
    unit = ControlUnit("embedded-a", sketch(), "invert", guidance_start=0.25, guidance_end=0.5)
    engines.text_to_image.generate(request(steps=8, controls=(unit,)))
    assert acting == [2, 3, 4]
    acting.clear()  # Heun evaluates twice a step: the same steps, each twice
    engines.text_to_image.generate(request(steps=8, scheduler="Heun", controls=(unit,)))
    assert acting == [2, 2, 3, 3, 4, 4]


def test_two_units_at_once_differ_from_each_alone(engines):
    engine = engines.text_to_image
    first = ControlUnit("embedded-a", sketch(), "invert")
    second = ControlUnit("embedded-b", sketch().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "invert", weight=0.7)
    both = pixels(engine.generate(request(controls=(first, second))))
    assert not np.array_equal(both, pixels(engine.generate(request(controls=(first,)))))
    assert not np.array_equal(both, pixels(engine.generate(request(controls=(second,)))))


@pytest.mark.parametrize("preset, model", [("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl")])
def test_sd2_and_sdxl_run_their_own_controlnets(engines, preset, model):
    engine = engines.text_to_image
    base = request(preset=preset, steps=3)
    plain = pixels(engine.generate(base))
    controlled = pixels(engine.generate(replace(base, controls=(ControlUnit(model, sketch(), "invert"),))))
    assert controlled.shape == plain.shape and not np.array_equal(controlled, plain)


def test_a_controlnet_of_another_family_is_refused_with_the_reason(engines):
    with pytest.raises(InvalidRequest, match=r"made for SDXL models and cannot steer Embedded shapes model \(offline\): a"):
        engines.text_to_image.plan(request(controls=(ControlUnit("sdxl", sketch()),)))


@pytest.mark.parametrize("unit, message", [
    (ControlUnit("nope", sketch()), "unknown model 'nope'. Available for Embedded shapes model (offline): embedded-a, embedded-b, elsewhere"),
    (ControlUnit("embedded-a", None), "give it a control image"),
    (ControlUnit("embedded-a", sketch(), weight=2.5), "the weight must be between 0 and 2"),
    (ControlUnit("embedded-a", sketch(), guidance_start=0.6, guidance_end=0.4), "0 <= start < end <= 1"),
    (ControlUnit("embedded-a", sketch(), preprocessor="depth_leres"), "unknown preprocessor 'depth_leres'"),
    (ControlUnit("embedded-a", sketch(), control_mode="Loud"), "control mode must be one of Balanced"),
    (ControlUnit("embedded-a", sketch(), preprocessor="canny", threshold_a=300), "Canny low threshold must be"),
    (ControlUnit("elsewhere", sketch()), "ControlNet 'Not here' is not here"),
])
def test_bad_units_get_a_clear_message_before_any_gpu_work(engines, unit, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        engines.text_to_image.plan(request(controls=(unit,)))


def test_more_units_than_allowed_and_an_oversized_control_image_are_refused(engines):
    unit = ControlUnit("embedded-a", sketch())
    with pytest.raises(InvalidRequest, match=r"At most 3 ControlNet unit\(s\) here \(got 4\)"):
        engines.text_to_image.plan(request(controls=(unit,) * 4))
    huge = replace(unit, image=Image.new("RGB", (8000, 7000)))
    with pytest.raises(InvalidRequest, match="the control image is too large"):
        engines.text_to_image.plan(request(controls=(huge,)))


def test_the_png_says_each_unit_as_a1111_writes_it_and_reads_back_into_a_unit(engines, catalog):
    unit = ControlUnit("embedded-a", sketch(), "canny", weight=0.8, guidance_start=0.1, guidance_end=0.9,
                       control_mode=PROMPT_MORE_IMPORTANT, resize_mode=JUST_RESIZE, processor_res=256,
                       threshold_a=50)
    result = engines.text_to_image.generate(request(steps=2, controls=(unit,)))
    fields = read_controlnet_fields(parse_parameters(result.images[0].parameters).extra)
    assert len(fields) == 1 and fields[0].module == "canny" and fields[0].model == "cn-embedded"
    assert fields[0].model_hash and len(fields[0].model_hash) == 8
    assert 'ControlNet 0: "Module: canny, Model: cn-embedded [' in result.images[0].parameters
    assert ("Weight: 0.8, Resize Mode: Just Resize, Processor Res: 256, Threshold A: 50, Threshold B: 200, "
            "Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, Control Mode: My prompt is more "
            "important") in result.images[0].parameters
    back, note = unit_from_fields(fields[0], catalog)
    # what ran, the preprocessor's default high threshold included
    assert back == replace(unit, image=None, threshold_b=200) and "not stored in a PNG" in note


def test_a1111s_own_field_reads_and_an_unknown_model_is_said():
    text = ("Module: scribble_xdog, Model: control_v11p_sd15_scribble [d4ba51ff], Weight: 1, Resize Mode: Crop and "
            "Resize, Processor Res: 512, Threshold A: 32, Threshold B: -1, Guidance Start: 0, Guidance End: 1, "
            "Pixel Perfect: True, Control Mode: ControlNet is more important")
    unit = parse_unit(text)
    assert unit == ControlNetFields("scribble_xdog", "control_v11p_sd15_scribble", "d4ba51ff", 1.0, CROP_AND_RESIZE,
                                    512, 32, -1, 0.0, 1.0, True, CONTROLNET_MORE_IMPORTANT)
    assert unit.text() == text
    form, note = unit_from_fields(unit, load_controlnets())
    assert form.model == "sd15-scribble" and form.preprocessor == "scribble" and form.pixel_perfect
    missing, note = unit_from_fields(replace(unit, model="control_v11e_sd15_shuffle"), load_controlnets())
    assert missing is None and "not offered here" in note
    # a detector not offered here is said, and the model's own preprocessor set (never the raw image as the map);
    # A1111's API writes Processor Res: -1
    other, note = unit_from_fields(replace(unit, module="openpose_full", processor_res=-1), load_controlnets())
    assert (other.preprocessor, other.processor_res) == ("scribble", 512)
    assert "The PNG's preprocessor 'openpose_full' is not offered here: 'scribble' is set" in note


def test_inpaint_and_sketch_to_image_use_their_own_picture_when_a_unit_has_none(engines):
    inpainter = engines.inpainter
    drawing = sketch()
    base = InpaintRequest(prompt=PROMPT, seed=2, steps=4, strength=0.8)
    plain = pixels(inpainter.sketch_to_image(drawing, base))
    controlled = inpainter.sketch_to_image(drawing, replace(base, controls=(ControlUnit("embedded-a", None, "invert"),)))
    assert not np.array_equal(pixels(controlled), plain)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((20, 20, 50, 50), fill=255)
    picture = Image.new("RGB", (64, 64), "blue")
    result = inpainter.inpaint(picture, mask, replace(base, controls=(ControlUnit("embedded-a", drawing, "invert"),)))
    out = np.asarray(result.images[0].image)
    assert out.shape == (64, 64, 3) and np.array_equal(out[:8, :8], np.asarray(picture)[:8, :8])  # outside the mask
    assert "ControlNet 0" in result.images[0].parameters


def test_preprocessors_make_the_maps_the_models_read():
    drawing = sketch()
    inverted = np.asarray(preprocess("invert", drawing, 64))
    assert inverted[0, 0].tolist() == [0, 0, 0] and inverted[32, 32].tolist() == [255, 255, 255]  # white lines on black
    edges = np.asarray(preprocess("canny", drawing, 64))
    assert set(np.unique(edges)) <= {0, 255} and edges[:, :, 0].any() and not edges[:20, :20].any()
    scribble = np.asarray(preprocess("scribble", drawing, 128))
    assert scribble.shape == (128, 128, 3) and scribble[64:, 64:].any() and not scribble[:40, :40].any()
    photo = Image.new("RGB", (200, 100), (200, 30, 30))
    assert preprocess("none", photo, 64).size == (200, 100)  # as it is, at its own size


def test_resize_modes_and_pixel_perfect_as_a1111():
    wide = Image.new("RGB", (200, 100), "white")
    assert fit_to_size(wide, (64, 64), JUST_RESIZE).getpixel((0, 32)) == (255, 255, 255)
    cropped = np.asarray(fit_to_size(wide, (64, 64), CROP_AND_RESIZE))
    assert cropped.min() == 255  # covers the square, the sides cut off
    lines = Image.new("RGB", (200, 100))
    lines.paste((255, 255, 255), (90, 0, 110, 100))  # a white line on black, top to bottom
    filled = np.asarray(fit_to_size(lines, (64, 64), RESIZE_AND_FILL))
    assert filled[0].max() == 0 and filled[32, 32].min() == 255  # fits inside, black ("no control") above and below
    depth = Image.new("RGB", (200, 100), (40, 40, 40))  # far away: dark grey, as A1111 fills, with its border colour
    assert np.asarray(fit_to_size(depth, (64, 64), RESIZE_AND_FILL)).reshape(-1, 3).tolist() == [[40, 40, 40]] * 4096
    assert pixel_perfect_resolution(wide, (64, 64), CROP_AND_RESIZE) == 64  # the shorter side scaled to cover
    assert pixel_perfect_resolution(wide, (64, 64), RESIZE_AND_FILL) == 32


def test_the_shipped_catalog_reads_and_names_a_family_for_each_model():
    catalog = load_controlnets()
    assert {"sd15-scribble", "sd15-canny", "sdxl-scribble", "sdxl-canny"} <= set(catalog.names)
    assert catalog.get("sd15-scribble").repo == "lllyasviel/control_v11p_sd15_scribble"
    assert all(catalog.get(name).family == "sd15" for name in catalog.for_family("sd15"))


def test_a_union_controlnet_reads_the_map_as_its_units_control_type(engines):
    engine = engines.text_to_image
    base = request(preset="tiny-sdxl", steps=3)
    plain = pixels(engine.generate(base))
    as_scribble = pixels(engine.generate(replace(base, controls=(ControlUnit("union", sketch(), "invert"),))))
    as_edges = pixels(engine.generate(replace(base, controls=(ControlUnit("union-as-edges", sketch(), "invert"),))))
    off = pixels(engine.generate(replace(base, controls=(ControlUnit("union", sketch(), "invert", weight=0.0),))))
    assert np.array_equal(off, plain)
    assert not np.array_equal(as_scribble, plain) and not np.array_equal(as_scribble, as_edges)
    with pytest.raises(InvalidRequest, match="reads a map by its kind and has none for the 'scribble'"):
        engine.generate(replace(base, controls=(ControlUnit("union", sketch(), "scribble"),)))


def test_a_t2i_adapter_runs_once_per_pass_inside_the_unet_and_leaves_it_as_it_was(engines, monkeypatch):
    from diffusers import T2IAdapter

    calls = []
    original = T2IAdapter.forward
    monkeypatch.setattr(T2IAdapter, "forward", lambda self, x: calls.append(x.shape) or original(self, x))
    engine = engines.text_to_image
    base = request(preset="tiny-sdxl", steps=4)
    plain = pixels(engine.generate(base))
    adapted = pixels(engine.generate(replace(base, controls=(ControlUnit("adapter", sketch(), "invert"),))))
    assert not np.array_equal(adapted, plain)
    assert calls == [(2, 3, 64, 64)]  # once for 4 steps, the map doubled for the two halves of guidance
    unets = [engines.manager.loaded_object(key) for key in list(engines.manager._entries) if key.part == "unet"]
    assert unets and all(not unet._forward_pre_hooks for unet in unets)  # the pass's hook is gone
    off = pixels(engine.generate(replace(base, controls=(ControlUnit("adapter", sketch(), "invert", weight=0.0),))))
    assert np.array_equal(off, plain)  # and nothing left behind changes the next image
    both = pixels(engine.generate(replace(base, controls=(ControlUnit("adapter", sketch(), "invert"),
                                                          ControlUnit("sdxl", sketch(), "invert")))))
    alone = pixels(engine.generate(replace(base, controls=(ControlUnit("sdxl", sketch(), "invert"),))))
    assert not np.array_equal(both, adapted) and not np.array_equal(both, alone)


def test_a_t2i_adapters_features_in_each_control_mode_as_a1111(folders):
    from diffusers import T2IAdapter

    adapter = T2IAdapter.from_pretrained(folders["adapter-sdxl"])
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = adapter(image)
    assert len(features) == 4

    def intrablock(mode):
        units = ControlUnits([adapter], [UnitSettings(weight=0.5, control_mode=mode)], ControlClock(10), True)
        with torch.no_grad():
            assert units(torch.zeros(2, 4, 8, 8), 1, None, [image], [1.0]) == (None, None)  # no ControlNet residuals
        return units.intrablock

    for feature, made in zip(features, intrablock("Balanced")):
        assert torch.allclose(made, feature * 0.5)
    for feature, made, factor in zip(features, intrablock(PROMPT_MORE_IMPORTANT), (0.25, 0.62, 0.825, 1.0)):
        assert torch.allclose(made, feature * 0.5 * factor)  # A1111's soft-injection table for adapters
    for feature, made, factor in zip(features, intrablock(CONTROLNET_MORE_IMPORTANT), (0.25, 0.62, 0.825, 1.0)):
        assert not made[0].any() and torch.allclose(made[1], feature[1] * 0.5 * factor)


def photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A small scene: a dark square on a lit gradient."""
    ramp = np.linspace(40, 220, size[0], dtype=np.uint8)[None, :, None].repeat(size[1], 0).repeat(3, 2)
    image = Image.fromarray(ramp)
    ImageDraw.Draw(image).rectangle((20, 16, 50, 44), fill=(30, 20, 10))
    return image


@pytest.mark.parametrize("name", ["lineart", "softedge", "depth"])
def test_the_learned_preprocessors_make_maps_with_their_weights(catalog, name):
    with preprocessor_weights(name, catalog, downloads=None) as folder:
        made = np.asarray(preprocess(name, photo(), 64, weights=folder))
    assert made.shape == (64, 96, 3) and made.std() > 0  # at the processor resolution, the image's shape kept
    if name == "depth":  # scaled over the image, as A1111 scales Depth Anything's relative depth
        assert made.min() == 0 and made.max() == 255
    with pytest.raises(ValueError, match="needs its weights"):
        preprocess(name, photo(), 64)


def test_a_unit_with_a_learned_preprocessor_generates_and_the_png_names_it(engines):
    result = engines.text_to_image.generate(request(preset="tiny-sdxl", steps=2,
                                                    controls=(ControlUnit("union", photo(), "depth"),)))
    assert 'ControlNet 0: "Module: depth_anything_v2, Model: union-sdxl [' in result.images[0].parameters


def test_a_learned_preprocessor_without_its_weights_is_refused_before_any_work(engines, catalog, tmp_path,
                                                                                monkeypatch):
    from studio.core.downloads import HubDownloads

    weights = {"lineart": PreprocessorWeights("lineart", ("sk_model.pth",), repo="lllyasviel/Annotators"),
               "depth": PreprocessorWeights("depth", ("model.safetensors",), local=tmp_path / "missing")}
    offline = HubDownloads(cache_dir=tmp_path / "cache", offline=lambda: True)
    units = tuple(ControlUnit("union", photo(), name) for name in ("lineart", "depth", "softedge", "canny"))
    problems = preprocessors_not_here(units, ControlNetCatalog([], weights), offline)
    assert problems == [
        "The lineart preprocessor needs sk_model.pth from lllyasviel/Annotators, which is not downloaded, and this "
        "server is offline. Pick another preprocessor, or run once with the Hub reachable.",
        f"The depth preprocessor's weights are not here: {tmp_path / 'missing'} does not exist.",
        "The softedge preprocessor's weights are not named in presets/controlnets.yaml (preprocessor_weights)."]
    monkeypatch.setattr(engines.text_to_image, "controlnets", ControlNetCatalog(list(catalog), {**catalog.weights,
                                                                                              "depth": weights["depth"]}))
    with pytest.raises(InvalidRequest, match="The depth preprocessor's weights are not here"):
        engines.text_to_image.generate(request(preset="tiny-sdxl", controls=(ControlUnit("union", photo(), "depth"),)))


def test_a_t2i_adapters_features_line_up_with_the_unets_blocks_at_any_size():
    """SDXL's adapter unshuffles by 16, but 1000 px is 125 latents, 63 after the UNet's first block: the map is
    padded to 1008 px (63 × 16), the features at 63 and 32, as the UNet's (a 1000 px map alone would not unshuffle)."""
    from diffusers import T2IAdapter

    from studio.models.controlnets import AdapterNet

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=1, downscale_factor=16,
                         adapter_type="full_adapter_xl")
    unet_sides = []
    side = 1000 // 8
    for _ in range(2):  # the UNet's downsamplers: 3×3 convolutions, stride 2, padding 1
        side = (side + 2 - 3) // 2 + 1
        unet_sides.append(side)
    with torch.no_grad():
        features = AdapterNet(adapter).features(torch.rand(2, 3, 1000, 1000))
        assert [feature.shape[-1] for feature in features] == [unet_sides[0], unet_sides[0], unet_sides[1],
                                                               unet_sides[1]] == [63, 63, 32, 32]
        with pytest.raises(RuntimeError):
            adapter(torch.rand(2, 3, 1000, 1000))
        image = torch.rand(1, 3, 1024, 1024)  # a multiple already: the adapter's own features, unpadded
        assert all(torch.equal(mine, its) for mine, its in zip(AdapterNet(adapter).features(image), adapter(image)))


def test_union_and_adapter_units_in_hires_fix_and_inpaint(engines):
    """Hires. fix's second pass makes the adapter's features again at its size; SDXL's inpaint ControlNet pipeline
    takes both kinds too."""
    from studio.tasks.hires import HiresFix

    units = (ControlUnit("adapter", sketch(), "invert"), ControlUnit("union", sketch(), "invert"))
    base = request(preset="tiny-sdxl", steps=2, hires=HiresFix(upscale=1.5, upscaler="Latent", steps=1))
    plain = pixels(engines.text_to_image.generate(base))
    controlled = pixels(engines.text_to_image.generate(replace(base, controls=units)))
    assert controlled.shape == plain.shape == (96, 96, 3) and not np.array_equal(controlled, plain)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    inpaint = InpaintRequest(prompt=PROMPT, preset="tiny-sdxl", seed=2, steps=2, strength=1.0)
    picture = Image.new("RGB", (64, 64), "blue")
    plain = pixels(engines.inpainter.inpaint(picture, mask, inpaint))
    controlled = pixels(engines.inpainter.inpaint(picture, mask, replace(inpaint, controls=units)))
    assert not np.array_equal(controlled, plain)


def test_unreadable_detector_weights_are_said_and_learned_detectors_run_at_most_at_1024(catalog, tmp_path):
    from studio.core.errors import ModelUnavailable

    (tmp_path / "sk_model.pth").write_bytes(b"not a torch file")
    with pytest.raises(ModelUnavailable, match=r"The lineart preprocessor's weights \(.*sk_model.pth\) could not be read"):
        preprocess("lineart", photo(), 64, weights=tmp_path)
    with preprocessor_weights("depth", catalog, downloads=None) as folder:
        made = preprocess("depth", photo((300, 200)), 2048, weights=folder)
    assert made.size == (1536, 1024)  # the shorter side capped at 1024, not 2048


def test_a_union_unit_given_a_map_as_it_is_says_how_it_reads_it(engines):
    def plan_warnings(preprocessor):
        unit = ControlUnit("union", sketch(), preprocessor)
        return engines.text_to_image.plan(request(preset="tiny-sdxl", controls=(unit,))).warnings

    assert not any("reads a map given as it is" in warning for warning in plan_warnings("invert"))
    assert ("ControlNet unit 1: Tiny Union reads a map given as it is (preprocessor none) as a scribble map (its type "
            "2); for a depth or edge map, pick the preprocessor of that kind and give it the photo."
            ) in plan_warnings("none")


def test_the_adapters_hook_is_gone_after_a_pass_that_failed(engines, monkeypatch):
    from diffusers import T2IAdapter

    def broken(self, x):
        raise RuntimeError("broken adapter")

    monkeypatch.setattr(T2IAdapter, "forward", broken)
    with pytest.raises(Exception, match="broken adapter"):
        engines.text_to_image.generate(request(preset="tiny-sdxl", steps=2,
                                               controls=(ControlUnit("adapter", sketch(), "invert"),)))
    unets = [engines.manager.loaded_object(key) for key in list(engines.manager._entries) if key.part == "unet"]
    assert unets and all(not unet._forward_pre_hooks for unet in unets)

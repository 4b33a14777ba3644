"""The embedded flow family (models/embedded-flux: FLUX-shaped, trained here) through the studio's FLUX code, judged
by the oracle: each flow sampler at the preset's defaults draws what the prompt asks; the model's own shift is the
one its scheduler's config says, and a shift of the user's changes the image and is recorded; previews (Fast and
TAESD) show the image forming from packed latents; inpaint and outpaint keep what is outside the mask; a Compare
grid sets the two embedded families side by side; both meet in the Arena."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_embedded_quality import MODELS, PROMPTS  # fixed before looking at any output: 4 seen, 4 held-out triples
from test_previews import pixels, run_with_previews

from studio.a1111.metadata import parse_parameters
from studio.a1111.schedulers import FLOW_SCHEDULERS
from studio.arena.battles import Arena, Contestant
from studio.arena.votes import open_store
from studio.embedded import oracle, scenes
from studio.embedded.flow_evaluation import PRESET, evaluate_flow_inpaint
from studio.evaluation.compare import CompareRequest, Comparison
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest
from studio.tasks.outpainting import Outpaint

SAMPLERS = list(FLOW_SCHEDULERS)


def preset_request(engines, **fields) -> TextToImageRequest:
    """A request at the preset's defaults (as the form starts), previews off unless asked."""
    preset = engines.text_to_image.presets.get(PRESET)
    return replace(TextToImageRequest.preset_defaults(preset), preset=PRESET, live_preview="Off", **fields)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_flow_sampler_draws_what_is_asked_at_the_presets_defaults(engines, sampler):
    right = {key: 0 for key in ("shape", "colour", "background", "position")}
    for seed, scene in enumerate(PROMPTS, start=1):
        request = preset_request(engines, prompt=scenes.caption(scene), seed=seed, scheduler=sampler)
        matches = oracle.read(engines.text_to_image.generate(request).images[0].image).matches(scene)
        for key in right:
            right[key] += matches[key]
    assert right["colour"] >= 7 and right["background"] >= 7, right
    assert right["shape"] >= 6 and right["position"] >= 6, right


def test_a_prompt_in_capitals_reads_as_in_lower_case(engines):
    """Its T5 knows the captions' words in lower case; "A Large Red Circle" must not be unknown capitals."""
    images = [engines.text_to_image.generate(preset_request(engines, prompt=prompt, seed=6)).images[0].image
              for prompt in ("A Large Red Circle In The Center On A Blue Background",
                             "a large red circle in the center on a blue background")]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_the_shipped_model_is_within_its_size_budget():
    total = sum(path.stat().st_size for path in (MODELS / "embedded-flux").rglob("*") if path.is_file())
    assert total <= 40 * 1024**2, f"{total / 1024**2:.1f} MB"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_models_own_shift_is_its_configs_and_a_users_shift_is_drawn_and_recorded(engines, sampler):
    """Its scheduler's config says shift 3 (static, as SD 3's): no shift of the user's (the form's empty field) and
    3 give the same image bit for bit with every sampler; shift 1 another, named in the PNG."""
    base = preset_request(engines, prompt="a large red circle in the center on a blue background", seed=4, steps=8,
                          scheduler=sampler)
    own, three, one = (engines.text_to_image.generate(replace(base, shift=shift)).images[0]
                       for shift in (None, 3.0, 1.0))
    assert np.array_equal(np.asarray(own.image), np.asarray(three.image))
    assert np.abs(np.asarray(own.image, dtype=int) - np.asarray(one.image, dtype=int)).mean() > 1
    assert "Shift" not in parse_parameters(own.parameters).extra
    assert parse_parameters(one.parameters).extra["Shift"] == "1"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_previews_unpack_the_latents_and_show_the_image_forming(engines, sampler):
    """Fast (the embedded VAE's factors) and TAESD (the embedded one: the same VAE's latents) previews of FLUX's
    packed latents, every step; the image the same bit for bit without them; the last close to it."""
    engine = engines.text_to_image
    request = preset_request(engines, prompt="a large yellow star at the top left on a black background", seed=2,
                             steps=6, scheduler=sampler, preview_every=1)
    plain = run_with_previews(engine, request, None)
    for way, size, closeness in (("Fast", 16, 0.15 * 255), ("TAESD", 64, 12)):
        previews: list[Image.Image] = []
        watched = run_with_previews(engine, replace(request, live_preview=way), previews)
        assert np.array_equal(pixels(watched), pixels(plain)), way
        assert [preview.size for preview in previews] == [(size, size)] * 6, way
        final = watched.images[0].image.convert("RGB").resize((size, size), Image.Resampling.BOX)
        difference = np.abs(np.asarray(previews[-1], dtype=float) - np.asarray(final, dtype=float)).mean()
        assert difference < closeness, (way, difference)


def test_inpaint_paints_the_asked_shape_in_the_box_and_keeps_every_pixel_outside(engines):
    """FluxInpaintPipeline on the embedded flow model (no Fill variant): studio.embedded.flow_evaluation's cases."""
    preset = engines.text_to_image.presets.get(PRESET)
    result = evaluate_flow_inpaint(engines.inpainter, preset, 8)
    assert result["outside pixels identical"] == 1.0
    assert result["right shape and colour inside the mask"] >= 5 / 8, result


def test_outpaint_extends_the_canvas_and_keeps_the_original(engines):
    image = scenes.render(scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "large"),)))
    request = InpaintRequest(prompt="a large red circle on the left on a blue background", preset=PRESET, seed=3,
                             steps=12, guidance_scale=3.0, mask_blur=2, live_preview="Off",
                             outpaint=Outpaint(right=32))
    made = engines.inpainter.inpaint(image, None, request).images[0]
    out = np.asarray(made.image.convert("RGB"), dtype=int)
    assert made.image.size == (96, 64)
    assert np.array_equal(out[:, :50], np.asarray(image, dtype=int)[:, :50])  # the band is 4 px, its blur 3 × 2
    assert np.abs(out[:, 64:] - np.array(scenes.PALETTE["blue"])).mean() < 40  # the background goes on


def test_a_compare_grid_sets_the_two_embedded_families_side_by_side_with_each_sampler(engines):
    comparison = Comparison(engines.text_to_image)
    scene = PROMPTS[1]
    result = comparison.compare(CompareRequest(prompt=scenes.caption(scene), seed=11, x_type="Preset",
                                               x_values=f"embedded, {PRESET}", y_type="Sampler",
                                               y_values=", ".join(SAMPLERS)))
    assert len(result.cells) == 6 and not result.warnings
    for item in result.cells:
        fields = parse_parameters(item.image.parameters)
        assert (fields.model, fields.scheduler) == (["embedded", PRESET][item.cell.x], SAMPLERS[item.cell.y])
        matches = oracle.read(item.image.image).matches(scene)
        assert matches["colour"] and matches["background"], (item.cell, matches)
    assert result.grids()[0].size[0] > 2 * 64


def test_the_two_embedded_families_meet_in_the_arena(engines, tmp_path):
    contestants = [Contestant("unet", "embedded", "Euler", 20, 3.0), Contestant("flow", PRESET, "DPM++ 2M", 20, 3.0)]
    arena = Arena(engines.text_to_image, open_store(tmp_path / "arena.sqlite3"), contestants)
    battle = arena.battle("visitor", "a large green triangle at the bottom right on a white background", seed=7)
    assert battle.left.size == battle.right.size == (64, 64)
    assert not np.array_equal(np.asarray(battle.left), np.asarray(battle.right))
    reveal = arena.vote("visitor", battle.battle_id, "right")
    assert {reveal.left, reveal.right} == {"unet", "flow"}
    assert {standing.name: standing.battles for standing in arena.leaderboard().standings} == {"unet": 1, "flow": 1}

"""Outpainting and soft inpainting on the embedded model, through the studio's Inpainter: the canvas, the
pre-fills, the limits, the PNG fields read back, the soft blend's settings and what soft inpainting keeps."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.a1111.metadata import parse_parameters
from studio.core.errors import InvalidRequest
from studio.tasks.inpainting import InpaintRequest, inpaint_request_from_parameters
from studio.tasks.outpainting import BLUR, EDGE, FILLS, NOISE, Outpaint, extend, outpaint_problems, placed
from studio.tasks.soft_inpainting import (
    SoftInpainting,
    kept_weight,
    latent_blend,
    soft_from_parameters,
    soft_parameters,
    soft_problems,
)

PROMPT = "a large red circle on a blue background"


def picture() -> Image.Image:
    """A red circle on blue, cut by the right border."""
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((30, 20, 80, 50), fill=(220, 30, 30))
    return image


def request(**fields) -> InpaintRequest:
    return InpaintRequest(**{"prompt": PROMPT, "seed": 3, "steps": 8, "guidance_scale": 3.0,
                             "live_preview": "Off"} | fields)


# ----- the canvas -----


@pytest.mark.parametrize("fill", FILLS)
def test_the_canvas_holds_the_image_unchanged_and_the_mask_is_the_new_area_and_a_band(fill):
    image = picture()
    canvas, mask = extend(image, Outpaint(left=8, right=24, top=16, fill=fill), mask_blur=3)
    assert canvas.size == (96, 80) and mask.shape == (80, 96)
    assert np.array_equal(np.asarray(canvas)[16:80, 8:72], np.asarray(image))
    assert mask[:16].all() and mask[:, :8].all() and mask[:, 72:].all()  # every new pixel is repainted
    assert mask[16:22].all()  # a band of 2 x blur into the image at the top...
    assert mask[22:, 8:14].all() and not mask[22:, 14].any()  # ... on the left...
    assert mask[22:, 66:72].all() and not mask[22:, 65].any()  # ... and the right
    assert not mask[22:, 14:66].any()  # the bottom did not grow: no band there


def test_each_pre_fill_carries_the_images_colours_outwards_in_its_own_way():
    image = picture()
    fills = {fill: np.asarray(extend(image, Outpaint(right=32, fill=fill), 2, seed=1)[0], dtype=np.float32)[:, 64:]
             for fill in FILLS}
    edge = np.asarray(image, dtype=np.float32)[:, -1]
    assert np.array_equal(fills[EDGE], np.repeat(edge[:, None], 32, axis=1))  # the nearest edge pixel, repeated
    blue = np.array([30, 60, 200], dtype=np.float32)
    far_column = fills[BLUR][:, -1]  # the blur fill mixes the image's colours: bluish-red, no other hue
    assert np.all(far_column[:, 2] > 60) and np.all(far_column.max(1) <= 221)
    assert np.abs(fills[BLUR][:4, -1] - blue).max() < 60  # the top rows are mostly the blue background
    grain = np.abs(np.diff(fills[NOISE], axis=1)).mean()  # the matched noise has grain; the blur fill is smooth
    assert grain > 3 * np.abs(np.diff(fills[BLUR], axis=1)).mean()


def test_a_canvas_past_the_limit_is_refused_with_the_largest_that_fits():
    problems = outpaint_problems(Outpaint(right=200, top=10), (64, 64), 128 * 128, "the limit for Embedded")
    message = problems["outpaint"]
    assert "264×74" in message and "the limit for Embedded of 16,384" in message
    right, top = (int(part.split()[1]) for part in message.split("at most ")[1].rstrip(" px.").split(", "))
    assert (64 + right) * (64 + top) <= 128 * 128 < (64 + right + 2) * (64 + top + 1)
    assert set(outpaint_problems(Outpaint(left=-4, fill="Lava", falloff=0), None, None)) == {
        "outpaint_left", "outpaint_fill", "outpaint_falloff"}


def test_a_mockups_placement_is_an_outpaint():
    assert placed((64, 48), (128, 96), (16, 8)) == Outpaint(left=16, top=8, right=48, bottom=40)
    with pytest.raises(ValueError, match="must hold the whole image"):
        placed((64, 48), (96, 96), (40, 0))


# ----- outpainting through the engine -----


def test_outpaint_gives_the_larger_image_the_original_unchanged_outside_the_band_and_reads_back(inpainter):
    image = picture()
    result = inpainter.inpaint(image, None, request(strength=0.85, mask_blur=2, outpaint=Outpaint(right=32, fill=EDGE)))
    made = result.images[0]
    out = np.asarray(made.image.convert("RGB"))
    assert made.image.size == (96, 64)
    # the band is 2 x blur = 4 px into the image; the blur reaches about 3 x blur further
    assert np.array_equal(out[:, :50], np.asarray(image)[:, :50])
    assert np.abs(out[:, 64:].astype(int) - np.asarray(image)[:, -1:].astype(int)).max() > 8  # repainted, not the fill
    fields = parse_parameters(made.parameters).extra
    assert fields["Outpaint"] == "right 32" and fields["Outpaint fill"] == EDGE
    filled, _ = inpaint_request_from_parameters(made.parameters, inpainter.presets, request())
    assert filled.outpaint == Outpaint(right=32, fill=EDGE)


def test_strokes_painted_on_the_image_are_repainted_with_the_new_area(inpainter):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (4, 4, 20, 20))
    plain = np.asarray(inpainter.inpaint(picture(), None, request(mask_blur=1, outpaint=Outpaint(bottom=16)))
                       .images[0].image.convert("RGB"))
    with_strokes = np.asarray(inpainter.inpaint(picture(), mask, request(mask_blur=1, outpaint=Outpaint(bottom=16)))
                              .images[0].image.convert("RGB"))
    assert np.array_equal(plain[4:20, 4:20], np.asarray(picture())[4:20, 4:20])
    assert not np.array_equal(with_strokes[4:20, 4:20], np.asarray(picture())[4:20, 4:20])


def test_outpaint_over_the_limit_or_with_a_bad_side_is_refused_before_the_model_runs(inpainter):
    with pytest.raises(InvalidRequest, match=r"the limit for .* \(128×128\) of 16,384: at most right 192 px"):
        inpainter.plan_inpaint(picture(), None, request(outpaint=Outpaint(right=200)))
    assert "outpaint_top" in inpainter.problems(request(outpaint=Outpaint(top=-8)), "inpaint")
    with pytest.raises(InvalidRequest, match="The mask is empty"):
        inpainter.plan_inpaint(picture(), None, request())


# ----- soft inpainting -----


def test_soft_settings_are_checked_and_written_and_read_as_a1111_does():
    assert set(soft_problems(SoftInpainting(schedule_bias=9, mask_influence=-0.1))) == {"soft_schedule_bias",
                                                                                         "soft_mask_influence"}
    fields = soft_parameters(SoftInpainting(preservation_strength=0.75))
    assert fields["Soft inpainting enabled"] is True
    assert fields["Soft inpainting preservation strength"] == "0.75"
    assert fields["Soft inpainting transition contrast boost"] == "4"
    assert soft_from_parameters({k: str(v) for k, v in fields.items()}) == SoftInpainting(preservation_strength=0.75)
    assert soft_from_parameters({"Mask blur": "4"}) is None


def test_the_blend_keeps_the_original_where_unmasked_the_step_where_masked_and_more_original_early():
    mask = torch.tensor([0.0, 0.5, 1.0])
    early, late = kept_weight(mask, 14.6, SoftInpainting()), kept_weight(mask, 0.03, SoftInpainting())
    assert early[0] == 0 and early[2] == 1 and late[0] == 0 and late[2] == 1
    assert early[1] < 0.01 < 0.9 < late[1]  # half masked: the original early, the step's own late
    assert kept_weight(mask, 1.0, SoftInpainting(preservation_strength=0))[0] == 0  # 0 ** 0 is not 1 here
    original, current = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    ones, zeros = torch.ones(1, 4, 3, 3), torch.zeros(1, 4, 3, 3)
    assert torch.allclose(latent_blend(original, current, zeros, 4.0), original, atol=1e-5)
    assert torch.allclose(latent_blend(original, current, ones, 4.0), current, atol=1e-5)
    half = latent_blend(original, current, ones / 2, 4.0)
    linear = (original + current) / 2
    assert (half.norm(dim=1) >= linear.norm(dim=1) - 1e-5).all()  # the contrast boost keeps the vectors long


@pytest.mark.parametrize("scheduler", ["Euler", "DPM++ 2M Karras", "DDIM", "DPM++ SDE", "UniPC"])
def test_soft_inpainting_keeps_every_unmasked_pixel_and_changes_the_masked_area(inpainter, scheduler):
    image = picture()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 16, 44, 40))
    soft = request(scheduler=scheduler, mask_blur=4, soft=SoftInpainting(),
                   prompt="a large yellow star on a blue background")
    made = inpainter.inpaint(image, mask, soft).images[0]
    hard = inpainter.inpaint(image, mask, replace(soft, soft=None)).images[0]
    out, before = np.asarray(made.image.convert("RGB"), dtype=int), np.asarray(image, dtype=int)
    assert np.array_equal(out[:4], before[:4]) and np.array_equal(out[-4:], before[-4:])
    assert np.abs(out[24:36, 24:36] - before[24:36, 24:36]).max() > 40
    assert not np.array_equal(out, np.asarray(hard.image.convert("RGB"), dtype=int))
    assert parse_parameters(made.parameters).extra["Soft inpainting schedule bias"] == "1"


def test_soft_inpainting_at_another_size_than_the_models_changes_nothing_outside_the_blur_and_fades_out(inpainter):
    """At 200×160 (the model works at 72×56) the paste-back mask is limited at the input's size: no pixel where
    the blurred mask is 0 changes, and where the blur fades out the result fades into the original, no step."""
    from studio.core.images import blur_mask
    from studio.tasks.inpainting import sharpened

    image = picture().resize((200, 160))
    mask = Image.new("L", (200, 160), 0)
    mask.paste(255, (60, 40, 130, 110))
    soft = request(mask_blur=12, soft=SoftInpainting(), prompt="a large yellow star on a blue background")
    out = np.asarray(inpainter.inpaint(image, mask, soft).images[0].image.convert("RGB"), dtype=int)
    before = np.asarray(image, dtype=int)
    hard_overlay = np.asarray(sharpened(blur_mask(np.asarray(mask) > 0, 12)), dtype=int)
    assert np.array_equal(out[hard_overlay == 0], before[hard_overlay == 0])
    fading = (hard_overlay > 0) & (hard_overlay < 16)  # the blur's last levels: at most that share of the result
    change = np.abs(out - before).max(axis=-1)
    assert (change[fading] <= np.abs(before[fading]).max() * 16 / 255 + 2).all()


def test_an_rgba_outpaint_with_soft_inpainting_is_opaque_and_the_models_in_the_new_area(inpainter):
    image = picture().convert("RGBA")
    image.putalpha(200)
    made = inpainter.inpaint(image, None, request(strength=0.6, outpaint=Outpaint(right=16), soft=SoftInpainting()))
    out = np.asarray(made.images[0].image)
    assert out.shape == (64, 80, 4) and (out[:, 64:, 3] == 255).all()  # the new area is the model's, opaque
    assert (out[:, :40, 3] == 200).all()  # the image's own transparency away from the band


def test_a_random_seeds_matched_noise_outpaint_is_made_again_from_each_images_png(inpainter):
    """The fill is drawn once per batch (from its first seed, which the PNG records): image 2's PNG, whose own
    seed is one more, gives it again too."""
    first = inpainter.inpaint(picture(), None, request(seed=-1, strength=0.6, batch_size=2,
                                                       outpaint=Outpaint(right=16, fill=NOISE)))
    made = first.images[1]
    again, _ = inpaint_request_from_parameters(made.parameters, inpainter.presets, request())
    second = inpainter.inpaint(picture(), None, again)
    assert again.seed == made.seed == first.images[0].seed + 1 and again.outpaint.fill == NOISE
    assert again.outpaint.fill_seed == first.images[0].seed
    assert np.array_equal(np.asarray(made.image), np.asarray(second.images[0].image))


def test_an_only_masked_rgba_outpaint_is_opaque_in_the_new_area(inpainter):
    image = picture().convert("RGBA")
    image.putalpha(200)
    made = inpainter.inpaint(image, None, request(inpaint_area="Only masked", padding=4,
                                                  outpaint=Outpaint(bottom=16)))
    assert (np.asarray(made.images[0].image)[64:, :, 3] == 255).all()

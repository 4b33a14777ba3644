import pytest
from PIL import Image

from studio.a1111.metadata import format_parameters, parse_parameters, read_parameters, save_png
from studio.models.presets import load_presets
from studio.tasks.generation import TextToImageRequest
from studio.tasks.parameters import request_from_parameters

A1111_TEXT = """masterpiece, a castle on a hill
at sunset
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3920213, Size: 512x768, Model hash: 879db523c3, Model: dreamshaper_8, Lora hashes: "detail: 1a2b, glow: 3c4d", Version: v1.10.1"""


def sample_parameters(**overrides):
    values = dict(steps=20, scheduler="DPM++ 2M Karras", guidance_scale=7.0, seed=1234, width=512, height=512,
                  model="embedded", model_hash="abcdef0123", version="Diffusion Studio 0.1.0")
    return format_parameters("a red circle, on blue", "ugly, blurry", **(values | overrides))


def test_format_matches_a1111():
    assert sample_parameters() == (
        "a red circle, on blue\nNegative prompt: ugly, blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef0123, Model: embedded, Version: Diffusion Studio 0.1.0"
    )


def test_round_trip():
    params = parse_parameters(sample_parameters(guidance_scale=7.5, model="my, model"))
    assert params.prompt == "a red circle, on blue" and params.negative_prompt == "ugly, blurry"
    assert (params.steps, params.scheduler, params.guidance_scale, params.seed) == (20, "DPM++ 2M Karras", 7.5, 1234)
    assert (params.width, params.height, params.model, params.model_hash) == (512, 512, "my, model", "abcdef0123")


def test_parses_a1111_output_with_multiline_prompt_and_quoted_values():
    params = parse_parameters(A1111_TEXT)
    assert params.prompt == "masterpiece, a castle on a hill\nat sunset"
    assert params.negative_prompt == "blurry, lowres"
    assert params.scheduler == "DPM++ 2M Karras" and params.guidance_scale == 6.5 and params.seed == 3920213
    assert (params.width, params.height) == (512, 768)
    assert params.extra["Lora hashes"] == "detail: 1a2b, glow: 3c4d"


def test_prompt_without_parameters_line():
    params = parse_parameters("just a prompt")
    assert params.prompt == "just a prompt" and params.steps is None


def test_png_round_trip(tmp_path):
    text = sample_parameters()
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "out.png", text)
    assert read_parameters(path) == text
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_parameters(plain) is None


def test_non_image_is_refused_clearly(tmp_path):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_bytes(b"hello")
    with pytest.raises(ValueError, match="could not be read as an image"):
        read_parameters(bogus)


def test_parameters_fill_a_request():
    current = TextToImageRequest("old", preset="embedded", scheduler="Euler", steps=20, width=64, height=64, seed=-1,
                                 batch_size=4, style="Anime")
    filled, notes = request_from_parameters(A1111_TEXT, load_presets(), current)
    # its LoRAs are not here: each is named, with its hash (the tags stay in the prompt)
    assert [note.split(" (hash")[0] for note in notes] == ["The image was made with LoRA 'detail'",
                                                          "The image was made with LoRA 'glow'"]
    assert filled.prompt.startswith("masterpiece") and filled.negative_prompt == "blurry, lowres"
    assert filled.preset == "dreamshaper-8"  # A1111's checkpoint stem "dreamshaper_8"
    other = A1111_TEXT.replace("Model: dreamshaper_8", "Model: juggernautXL_v9")
    filled, notes = request_from_parameters(other, load_presets(), current)
    notes = [note for note in notes if "LoRA" not in note]  # its LoRAs' notes: the test above
    assert filled.preset == "embedded" and notes == [
        "The image was made with model 'juggernautXL_v9', which is not one of the presets here; the model stays "
        "embedded."]
    assert (filled.steps, filled.scheduler, filled.seed, filled.width, filled.height) == (
        28, "DPM++ 2M Karras", 3920213, 512, 768)
    assert filled.style == "None" and filled.batch_size == 1


def test_a_sampler_the_studio_lacks_keeps_the_form_and_says_so():
    current = TextToImageRequest("old", preset="embedded", scheduler="DDIM", steps=20, width=64, height=64)
    text = A1111_TEXT.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM adaptive, Schedule type: Automatic")
    filled, notes = request_from_parameters(text, load_presets(), current)
    notes = [note for note in notes if "LoRA" not in note]
    assert filled.scheduler == "DDIM" and filled.steps == 28  # the rest is still read
    assert "sampler DPM adaptive (Automatic schedule), which this studio does not have; the sampler stays DDIM" in notes[0]


def test_an_sdxl_pngs_clip_skip_is_ignored_as_a1111_does_and_said():
    text = A1111_TEXT.replace("Model: dreamshaper_8", "Model: sdxl-base-1.0").replace("Size: 512x768", "Size: 1024x1024")
    text = text.replace("Steps: 28,", "Steps: 28, Clip skip: 2,")
    current = TextToImageRequest("old", preset="embedded", scheduler="Euler", steps=20, width=64, height=64)
    filled, notes = request_from_parameters(text, load_presets(), current)
    notes = [note for note in notes if "LoRA" not in note]
    assert filled.preset == "sdxl-base-1.0" and filled.clip_skip == 1
    assert notes == ["The image says clip skip 2, which A1111 ignores for SDXL base 1.0 as this studio does: it is 1 "
                     "here."]

"""Text to image on the embedded model, in process, through the shared memory manager."""

import threading

import numpy as np
import pytest

from studio.a1111.metadata import parse_parameters
from studio.a1111.schedulers import GENERAL_SCHEDULERS
from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.tasks.generation import TextToImageRequest


def request(**overrides):
    values = dict(prompt="a red circle on a blue background", preset="embedded", scheduler="Euler", steps=8,
                  guidance_scale=7.0, width=64, height=64, seed=42)
    return TextToImageRequest(**(values | overrides))


def pixels(result, index=0):
    return np.asarray(result.images[index].image)


def test_embedded_model_loads_through_from_pretrained(engine, manager):
    result = engine.generate(request())
    assert result.images[0].image.size == (64, 64) and result.seeds == [42]
    components = {(r.source.rsplit("/", 1)[-1], r.component) for r in manager.status().models}
    assert {("embedded-sd", "unet"), ("embedded-sd", "vae"), ("embedded-sd", "text_encoder")} <= components


def test_same_seed_gives_identical_pixels(engine):
    assert np.array_equal(pixels(engine.generate(request())), pixels(engine.generate(request())))
    assert not np.array_equal(pixels(engine.generate(request())), pixels(engine.generate(request(seed=43))))


def test_batch_image_i_equals_the_single_image_with_seed_plus_i(engine):
    batch = engine.generate(request(seed=100, batch_size=3))
    assert batch.seeds == [100, 101, 102]
    for index in range(3):
        alone = engine.generate(request(seed=100 + index))
        assert np.array_equal(pixels(batch, index), pixels(alone))


def test_random_seed_is_reported_and_reproduces(engine):
    first = engine.generate(request(seed=-1))
    seed = first.seeds[0]
    assert 0 <= seed < 2**32
    assert np.array_equal(pixels(first), pixels(engine.generate(request(seed=seed))))


@pytest.mark.parametrize("scheduler", GENERAL_SCHEDULERS)
def test_every_scheduler_runs_and_is_recorded(engine, scheduler):
    result = engine.generate(request(scheduler=scheduler, steps=4))
    params = parse_parameters(result.images[0].parameters)
    assert params.scheduler == scheduler and params.steps == 4 and params.seed == 42


def test_parameters_record_the_styled_prompt_and_are_in_the_png_info(engine):
    result = engine.generate(request(style="Pixel art", negative_prompt="blurry"))
    params = parse_parameters(result.images[0].image.info["parameters"])
    assert params.prompt.startswith("pixel art of a red circle")
    assert params.negative_prompt.startswith("blurry, ")
    assert (params.width, params.height, params.model) == (64, 64, "embedded")
    assert params.model_hash and len(params.model_hash) == 10


@pytest.mark.parametrize("scheduler", ["Euler", "Heun", "DPM++ SDE Karras"])
def test_progress_follows_every_step_of_every_image(engine, scheduler):
    """Heun and DPM++ SDE evaluate the model twice a step (diffusers calls back twice): still 1..5 per image.
    Before the first step, what it waits for (loading, encoding) is said at step 0."""
    seen = []
    engine.generate(request(steps=5, batch_size=2, scheduler=scheduler),
                    on_progress=lambda done, total, _: seen.append((done, total)))
    assert seen[0] == (0, 10)
    seen = seen[1:]
    done = [done for done, _ in seen[:-1]]
    assert sorted(set(done)) == list(range(1, 11)) and done == sorted(done) and seen[-1] == (10, 10)


def test_stop_in_the_second_half_of_a_two_evaluation_sampler_marks_the_image(engine):
    cancel = threading.Event()

    def on_progress(done, total, _):
        if done >= 6:
            cancel.set()

    result = engine.generate(request(steps=8, scheduler="Heun"), on_progress=on_progress, cancel=cancel)
    assert result.interrupted and 6 <= result.images[0].stopped_at < 8, result.images[0].stopped_at
    assert "Stopped at step: " in result.images[0].parameters


def test_dpm_sde_is_reproducible_from_the_seed(engine):
    """Its Brownian noise is drawn from the image's seed, as A1111 does: same seed, same pixels."""
    same = [pixels(engine.generate(request(scheduler="DPM++ SDE Karras", steps=6, seed=5))) for _ in range(2)]
    other = pixels(engine.generate(request(scheduler="DPM++ SDE Karras", steps=6, seed=6)))
    assert np.array_equal(*same) and not np.array_equal(same[0], other)


def test_cancel_interrupts_the_denoising_loop(engine):
    cancel = threading.Event()
    steps_run = []

    def on_progress(done, total, _):
        steps_run.append(done)
        if done == 3:
            cancel.set()

    result = engine.generate(request(steps=50, batch_size=4), on_progress=on_progress, cancel=cancel)
    assert result.interrupted and len(result.images) == 1
    assert max(d for d in steps_run if d < 200) == 3  # no step ran after the one that asked to stop
    # the unfinished image says so: in its caption and in its PNG parameters, with the step it stopped at
    unfinished = result.images[0]
    assert unfinished.stopped_at == 3 and "unfinished (stopped at step 3)" in unfinished.caption
    params = parse_parameters(unfinished.image.info["parameters"])
    assert params.steps == 50 and params.extra["Stopped at step"] == "3"


def test_a_finished_image_is_not_marked(engine):
    result = engine.generate(request(steps=4))
    assert result.images[0].stopped_at is None and result.images[0].caption == "Seed 42"
    assert "Stopped at step" not in result.images[0].parameters


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "   "}, "Enter a prompt"),
        ({"prompt": "x" * 2001}, "Prompt is too long"),
        ({"steps": 0}, "Steps must be between 1 and 100"),
        ({"steps": 101}, "Steps must be between 1 and 100"),
        ({"guidance_scale": -1.0}, "CFG scale must be between 0 and 30"),
        ({"width": 1024}, "Width must be a multiple of 8 between 32 and 128"),
        ({"height": 60}, "Height must be a multiple of 8"),
        ({"batch_size": 0}, "Batch size must be between 1 and 8"),
        ({"seed": -2}, "Seed must be -1"),
        ({"scheduler": "LCM"}, "Scheduler 'LCM' does not work with Embedded shapes model"),
        ({"scheduler": "DPM adaptive"}, "Unknown scheduler 'DPM adaptive'"),
        ({"style": "Vaporwave"}, "Unknown style 'Vaporwave'"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(engine, overrides, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(request(**overrides))


def test_unknown_preset_is_refused(engine):
    with pytest.raises(InvalidRequest, match="Unknown preset .nope.. Available presets: embedded"):
        engine.generate(request(preset="nope"))


def test_hub_preset_offline_fails_clearly_and_leaves_the_manager_working(engine, manager, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = manager.status().models
    with pytest.raises(ModelUnavailable, match="(?s)Preset 'SDXL base 1.0' is not downloaded yet.*stabilityai/stable-diffusion"):
        engine.generate(request(preset="sdxl-base-1.0", scheduler="Euler", width=1024, height=1024))
    assert manager.status().models == before
    assert engine.generate(request()).images


def test_a_hub_preset_offline_is_named_before_its_sizes_are_refused(engine, monkeypatch):
    """The model is checked first: a request at the embedded model's 64 px was refused for its width before it was
    said that the model is not here (moot: picking the preset fits the sizes to it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = engine.problems(request(preset="sdxl-base-1.0"))  # 64×64 and Euler: refused by SDXL's own checks
    assert list(problems) == ["preset"]
    assert problems["preset"] == ("Preset 'SDXL base 1.0' is not downloaded yet, and the Hugging Face Hub cannot be "
                                  "reached: connect to the internet and try again, or pick the embedded preset, "
                                  "which works offline.")
    with pytest.raises(ModelUnavailable) as raised:  # and the request itself: the download command with it
        engine.generate(request(preset="sdxl-base-1.0"))
    assert raised.value.reason == problems["preset"]
    assert raised.value.command.startswith("hf download stabilityai/stable-diffusion-xl-base-1.0 \\\n")
    assert engine.unavailable_model(engine.presets.get("embedded")) is None


def test_progress_says_what_the_job_waits_for_before_its_first_step():
    """Reading the model's hash (once, with its bytes), loading the model (the first time), encoding the prompt:
    the page said "Reading the model's hash - 0.0%" and "0/1 steps" through all of it."""
    from studio.models.presets import load_presets
    from studio.tasks.engines import local_engines

    fresh = local_engines(load_presets()).text_to_image  # its own manager and hash cache: nothing loaded or read yet
    plan = fresh.plan(request(steps=2))
    hashing = []
    with fresh.model_files(plan, lambda done, total, text: hashing.append((done, total, text))):
        pass
    assert hashing and all(text.startswith("Reading diffusion_pytorch_model.safetensors for its hash (once per "
                                            "file): ") for _, _, text in hashing)
    assert hashing[-1][0] == hashing[-1][1] > 1_000_000 and hashing[-1][2].endswith("7.7 MB of 7.7 MB")
    texts = []
    for _ in range(2):
        fresh.generate(request(steps=2), on_progress=lambda done, total, text: texts.append((done, total, text)))
    assert texts[:3] == [(0, 2, "Loading Embedded shapes model (offline) and encoding the prompt"),
                         (1, 2, "Image 1/1, step 1/2"), (2, 2, "Image 1/1, step 2/2")]
    assert texts[4] == (0, 2, "Encoding the prompt")  # the second job: the model is loaded
    again = []
    with fresh.model_files(fresh.plan(request(steps=2)), lambda *report: again.append(report)):
        pass
    assert again == []  # read once per file


def test_clip_skip_reads_the_second_to_last_layer_for_the_prompt_and_the_negative_as_a1111_does(stages, engine):
    """diffusers' encode_prompt skips layers for the prompt only (and fails on transformers 5's CLIPTextModel);
    A1111 skips them for the negative too."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from studio.embedded.stages import PIPELINE_DIR
    from studio.models.presets import load_presets

    folder = load_presets().get("embedded").local.parent / PIPELINE_DIR
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()

    def penultimate(text):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
            return encoder.final_layer_norm(hidden)

    preset = engine.presets.get("embedded")
    skipped, _ = stages.encode(preset, "text2img", "a red circle", "blue", 3.0, clip_skip=2)
    last, _ = stages.encode(preset, "text2img", "a red circle", "blue", 3.0)
    assert torch.allclose(skipped.embeds["prompt_embeds"].float().cpu(), penultimate("a red circle"), atol=1e-4)
    assert torch.allclose(skipped.embeds["negative_prompt_embeds"].float().cpu(), penultimate("blue"), atol=1e-4)
    assert not torch.allclose(last.embeds["negative_prompt_embeds"].float().cpu(), penultimate("blue"), atol=1e-2)


def test_clip_skip_is_written_and_read_back_as_a1111_does(engine):
    from studio.tasks.parameters import request_from_parameters

    two = engine.generate(request(clip_skip=2, steps=2)).images[0]
    assert "Clip skip: 2" in two.parameters
    assert "Clip skip" not in engine.generate(request(steps=2)).images[0].parameters  # A1111 omits 1
    filled, _ = request_from_parameters(two.parameters, engine.presets, request(clip_skip=1))
    assert filled.clip_skip == 2
    assert engine.presets.get("anything-v5").default_clip_skip == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(clip_skip=13), "Clip skip must be between 1 and 12"),
    (dict(clip_skip=0), "Clip skip must be between 1 and 12"),
    (dict(clip_skip=2.5), "Clip skip must be a whole number"),
    (dict(clip_skip=2, preset="sdxl-base-1.0", width=1024, height=1024), "Clip skip applies to SD 1.x models"),
    # the embedded text encoder has 3 layers: 4 would read the token embeddings, 5 does not exist
    (dict(clip_skip=4), "Clip skip 4 is more than this model's text encoder has layers (3)"),
])
def test_bad_clip_skip_is_refused_clearly(engine, overrides, message):
    assert message in " ".join(engine.problems(request(**overrides)).values())


def test_clip_skip_up_to_the_text_encoders_layers_runs(engine):
    assert "Clip skip: 3" in engine.generate(request(clip_skip=3, steps=2)).images[0].parameters

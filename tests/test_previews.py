"""Live previews in the engine: a preview every N steps of the sampler's estimate of the clean image, through the
family's latent-to-RGB factors; the final image the same bit for bit with previews on and off; previews across a
fork through the job board's shared memory."""

import multiprocessing
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from studio.core.jobs import PREVIEW_SIDE, JobBoard, LocalJob
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"
FAST_EVERY_STEP = dict(live_preview="Fast", preview_every=1)  # the latents' factors, each step (not Auto's budget)


def run_with_previews(engine, request, previews: list | None):
    job = LocalJob(on_preview=lambda image, part: previews.append(image)) if previews is not None else LocalJob()
    with engine.model_files(engine.plan(request)) as plan:
        return engine.run(plan, job)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), dtype=np.float64) / 255


@pytest.mark.parametrize("scheduler", ["Euler", "Euler a", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ 2M SDE", "Heun",
                                       "DPM2", "LMS", "UniPC", "DDIM"])
def test_a_preview_every_step_and_the_final_image_is_the_same_without_them(engines, scheduler, monkeypatch):
    import studio.tasks.previews as previews_module

    estimates = []  # whether each step's output gave an estimate of the clean image (x0)
    found = previews_module.clean_estimate
    monkeypatch.setattr(previews_module, "clean_estimate",
                        lambda scheduler_, output: estimates.append(found(scheduler_, output)) or estimates[-1])
    request = TextToImageRequest(prompt=PROMPT, seed=11, steps=6, scheduler=scheduler, **FAST_EVERY_STEP)
    previews: list[Image.Image] = []
    watched = run_with_previews(engines.text_to_image, request, previews)
    assert estimates and all(estimate is not None for estimate in estimates), scheduler  # never the noisy latents
    unwatched = run_with_previews(engines.text_to_image, request, None)
    assert np.array_equal(pixels(watched), pixels(unwatched))
    assert len(previews) == 6 and all(preview.size == (16, 16) for preview in previews)  # 64 px / the VAE's 4
    # the last preview is the image, approximately (the factors explain 82% of the colour variance)
    final = np.asarray(watched.images[0].image.convert("RGB").resize((16, 16), Image.Resampling.BOX)) / 255
    assert np.abs(np.asarray(previews[-1]) / 255 - final).mean() < 0.15


def test_previews_show_the_clean_estimate_so_the_scene_shows_early(engines, monkeypatch):
    """At step 3 of 12 the noisy latents are still mostly noise; the sampler's estimate of the clean image already
    shows the scene: its preview is nearer the final image than a preview of the noisy latents."""
    import studio.tasks.previews as previews_module

    request = TextToImageRequest(prompt=PROMPT, seed=5, steps=12, scheduler="Euler", **FAST_EVERY_STEP)
    estimated: list = []
    result = run_with_previews(engines.text_to_image, request, estimated)
    monkeypatch.setattr(previews_module, "clean_estimate", lambda scheduler, output: None)
    noisy: list = []
    run_with_previews(engines.text_to_image, request, noisy)
    final = np.asarray(result.images[0].image.convert("RGB").resize((16, 16), Image.Resampling.BOX)) / 255

    def distance(preview):
        return np.abs(np.asarray(preview) / 255 - final).mean()

    assert distance(estimated[2]) < 0.7 * distance(noisy[2])
    assert distance(estimated[-1]) < 0.15


def test_every_n_steps_and_off(engines):
    base = TextToImageRequest(prompt=PROMPT, seed=3, steps=7, preview_every=3)
    previews: list = []
    run_with_previews(engines.text_to_image, base, previews)
    assert len(previews) == 3  # steps 3, 6 and the last (7)
    previews.clear()
    run_with_previews(engines.text_to_image, replace(base, live_preview="Off"), previews)
    assert previews == []


def test_inpaint_and_sketch_to_image_show_previews_too(engines):
    previews: list = []
    request = InpaintRequest(prompt=PROMPT, seed=2, steps=4, strength=1.0, **FAST_EVERY_STEP)
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((220, 30, 30), (20, 20, 44, 44))
    job = LocalJob(on_preview=lambda image, part: previews.append(image))
    engine = engines.inpainter
    with engine.model_files(engine.plan_sketch(sketch, request)) as plan:
        engine.run(plan, job)
    assert len(previews) == 4


def test_bad_preview_settings_are_refused_with_a_message(engines):
    problems = engines.text_to_image.problems(TextToImageRequest(prompt=PROMPT, live_preview="Sometimes",
                                                                 preview_every=-1))
    assert problems["live_preview"] == "Live preview must be one of Off, Fast, TAESD (got 'Sometimes')."
    assert problems["preview_every"].startswith("Preview every N steps must be between 1 and ")
    assert problems["preview_every"].endswith(", or 0 for Auto (got -1).")


def _show_from_the_worker(board: JobBoard, slot: int) -> None:
    job = board.attach(slot)
    job.show(Image.new("RGB", (2 * PREVIEW_SIDE, PREVIEW_SIDE), (10, 200, 30)), part=1)


def test_a_preview_shown_in_a_forked_worker_reaches_the_main_process():
    board = JobBoard(slots=4)
    job = board.open("session", "tab", previews=True)
    assert board.attach(job.slot).wants_previews and job.latest_preview() == (0, None, 0)
    worker = multiprocessing.get_context("fork").Process(target=_show_from_the_worker, args=(board, job.slot))
    worker.start()
    worker.join(30)
    number, preview, part = job.latest_preview()
    assert number > 0 and preview.size == (PREVIEW_SIDE, PREVIEW_SIDE // 2) and part == 1  # scaled, its shape kept
    assert preview.getpixel((5, 5)) == (10, 200, 30)
    assert job.latest_preview(after=number) == (number, None, 0)  # nothing newer
    board.close(job)
    again = board.open("other", "tab")
    assert not again.wants_previews and again.latest_preview() == (0, None, 0)  # a reused slot starts clean


def test_watched_jobs_share_a_few_preview_lanes_and_a_job_without_one_shows_nothing():
    board = JobBoard(slots=4, preview_lanes=1)
    first, second = board.open("a", "tab", previews=True), board.open("b", "tab", previews=True)
    assert first.wants_previews and not second.wants_previews  # one lane: the second runs without previews
    second.show(Image.new("RGB", (8, 8), "red"))
    first.show(Image.new("RGB", (8, 8), "blue"))
    assert second.latest_preview().image is None and first.latest_preview().image.getpixel((0, 0)) == (0, 0, 255)
    board.close(first)
    third = board.open("c", "tab", previews=True)
    assert third.wants_previews and third.latest_preview() == (0, None, 0)  # the lane, freed, starts clean


def test_a_public_demo_shows_no_previews_where_a_safety_checker_looks_at_the_images():
    """On a public demo every preset but the embedded one is checked, and a preview is not: it could show what the
    checker then hides, so there is none; locally (no checker on a plain preset) there is."""
    from studio.models.presets import load_presets
    from studio.tasks.engines import ManagerSettings, build_engines, build_manager
    from studio.tasks.previews import preview_every_of
    from studio.tasks.requests import RequestLimits

    presets = load_presets()
    manager, models = build_manager(presets, ManagerSettings(public=True))
    public = build_engines(manager, models, presets, limits=RequestLimits.public()).text_to_image
    request = TextToImageRequest(prompt=PROMPT, preview_every=2)
    dreamshaper = presets.get("dreamshaper-8")
    assert public.models.needs_safety_checker(dreamshaper) and not dreamshaper.safety_checker
    assert preview_every_of(request, True, public.limits.previews_of_checked_presets) is None
    assert preview_every_of(request, False, RequestLimits().previews_of_checked_presets) == 2
    assert preview_every_of(request, True, RequestLimits().previews_of_checked_presets) == 2  # a local studio
    # the embedded shapes are safe by construction: previews even on a public demo
    assert public.plan(request).previews and public.plan(request).preview_every == 2


def test_a_failing_preview_costs_the_image_nothing(engines, monkeypatch):
    import studio.tasks.previews as previews_module

    def broken(family, latents):
        raise ValueError("no factors")

    monkeypatch.setattr(previews_module, "latents_preview", broken)
    request = TextToImageRequest(prompt=PROMPT, seed=4, steps=3, **FAST_EVERY_STEP)
    previews: list = []
    watched = run_with_previews(engines.text_to_image, request, previews)
    assert previews == [] and np.array_equal(pixels(watched), pixels(run_with_previews(engines.text_to_image, request,
                                                                                         None)))


def test_a_watched_job_whose_handler_leaves_is_stopped_without_the_handler_waiting_for_it():
    """gradio closes a generator handler on its event loop when the visitor leaves: closing must not wait for the
    job (the whole server would), which is stopped, and its slot freed only once its work has ended."""
    import contextlib
    import threading
    import time

    from components.running import PREVIEW, JobRunner

    board = JobBoard(slots=2)
    runner = JobRunner(board=board)
    ended = threading.Event()

    class Engine:
        @contextlib.contextmanager
        def model_files(self, plan, on_progress=None):
            yield plan

    def device_work(plan, slot):
        job = board.attach(slot)
        while not job.cancelled:
            job.show(Image.new("RGB", (8, 8), (time.monotonic_ns() % 255, 0, 0)))
            time.sleep(0.05)
        time.sleep(0.5)  # the rest of its step, its decode
        ended.set()
        return "stopped"

    run = runner._run_job("visitor", "tab", lambda *args, **kwargs: None, Engine(), lambda: "plan", device_work,
                          "Cannot generate", previews=True)
    kind, _ = next(run)
    assert kind == PREVIEW
    began = time.monotonic()
    run.close()  # the visitor left
    assert time.monotonic() - began < 0.3 and not ended.is_set()
    assert len(board._free) == 1  # the slot is still the job's while it runs
    assert ended.wait(5)
    time.sleep(0.1)
    assert len(board._free) == 2  # freed once its work ended


def test_an_inpaint_preview_is_pasted_into_the_picture_where_the_result_goes():
    """"Only masked" works on a crop: its preview goes back into that crop of the picture, through the mask; the
    picture's pixels elsewhere are its own; a large picture is shown at most PREVIEW_PICTURE_SIDE a side."""
    from studio.core.images import prepare_image
    from studio.tasks.inpainting import PREVIEW_PICTURE_SIDE, Finishing

    picture = Image.new("RGB", (1024, 768), (0, 0, 255))
    overlay = Image.new("L", picture.size, 0)
    overlay.paste(255, (512, 256, 768, 512))  # the mask, inside the crop the model worked on
    finishing = Finishing(prepare_image(picture), overlay, region=(384, 128, 896, 640), crop_size=(512, 512))
    shown = np.asarray(finishing.preview_in_picture(Image.new("RGB", (64, 64), (255, 255, 0))))
    assert shown.shape == (384, PREVIEW_PICTURE_SIDE, 3)  # half size
    assert (shown[140:250, 260:380] == (255, 255, 0)).all()  # the mask's inside (256-384 × 128-256, scaled)
    assert (shown[:120] == (0, 0, 255)).all() and (shown[:, :250] == (0, 0, 255)).all()  # the picture elsewhere
    assert (shown[70:120, 200:250] == (0, 0, 255)).all()  # inside the crop, outside the mask: the picture's own


def test_a_compare_grid_shows_its_cells_filling_in_and_the_cells_are_the_same_without_previews(engines, monkeypatch):
    """The grid's live preview: the running cell's preview in its place under the headers, and each finished cell
    once it is done (drawn whatever the interval); the cells' images bit for bit those made without previews."""
    import studio.evaluation.compare as compare_module
    from studio.evaluation.compare import Comparison, CompareRequest

    monkeypatch.setattr(compare_module, "PREVIEW_INTERVAL_S", 0.0)  # every preview drawn: each step is seen
    comparison = Comparison(engines.text_to_image)
    base = TextToImageRequest(prompt=PROMPT, **FAST_EVERY_STEP)
    request = CompareRequest(prompt=PROMPT, seed=5, x_type="Steps", x_values="3, 4", base=base)
    shown: list[Image.Image] = []
    with comparison.model_files(comparison.plan(request)) as plan:
        watched = comparison.run(plan, LocalJob(on_preview=lambda image, part: shown.append(image)))
        plain = comparison.run(plan, LocalJob())
    assert len(shown) == 3 + 1 + 4 + 1  # each cell's steps, then the cell as made
    sizes = {image.size for image in shown}
    assert len(sizes) == 1 and next(iter(sizes))[0] > next(iter(sizes))[1]  # one grid, two cells side by side
    first_done = np.asarray(shown[3], dtype=np.int16)
    assert not np.array_equal(first_done, np.asarray(shown[2], dtype=np.int16))  # the made cell replaced its preview
    assert np.array_equal(np.asarray(shown[-1])[:, : first_done.shape[1] // 2],  # the first cell stays as it was made
                          first_done[:, : first_done.shape[1] // 2].astype(np.uint8))
    for with_previews, without in zip(watched.cells, plain.cells):
        assert np.array_equal(np.asarray(with_previews.image.image), np.asarray(without.image.image))


def test_an_arena_battle_shows_each_side_forming_as_its_own_part(engines, tmp_path, monkeypatch):
    import studio.tasks.previews as previews_module
    from studio.arena.battles import Arena, Contestant
    from studio.arena.votes import open_store

    monkeypatch.setattr(previews_module, "PREVIEW_BUDGET", 1e9)  # Auto then shows every step

    arena = Arena(engines.text_to_image, open_store(tmp_path / "arena.sqlite3"),
                  [Contestant("fast", "embedded", "Euler", 3, 3.0), Contestant("slow", "embedded", "Euler", 5, 3.0)])
    parts: list[int] = []
    plan = arena.plan("visitor", PROMPT, seed=3)
    with arena.model_files(plan) as plan:
        arena.run(plan, LocalJob(on_preview=lambda image, part: parts.append(part)))
    steps = [sampling_plan.steps for sampling_plan in plan.plans]
    assert parts == [0] * steps[0] + [0] + [1] * steps[1] + [1]  # each side forming, then as made



def test_taesd_previews_are_the_presets_tiny_decoder_at_the_images_size_leased_beside_the_unet(engines):
    """The embedded preset's TAESD (trained here, models/embedded-taesd) decodes each preview at the image's size;
    it is a model of its own kind in the manager, leased for the watched pass only; the image is the same bit for
    bit as with Fast previews and none."""
    from studio.models.preview_decoders import PREVIEW_DECODER, preview_decoder_key

    engine = engines.text_to_image
    request = TextToImageRequest(prompt=PROMPT, seed=8, steps=5, width=64, height=64, preview_every=1)
    assert request.live_preview == "TAESD" and engine.plan(request).preview_decoder.endswith("embedded-taesd")
    taesd: list[Image.Image] = []
    with_taesd = run_with_previews(engine, request, taesd)
    fast: list[Image.Image] = []
    with_fast = run_with_previews(engine, replace(request, **FAST_EVERY_STEP), fast)
    assert [image.size for image in taesd] == [(64, 64)] * 5 and [image.size for image in fast] == [(16, 16)] * 5
    key = preview_decoder_key(engine.plan(request).preview_decoder)
    assert key.kind == PREVIEW_DECODER and engines.manager.is_loaded(key)  # loaded through the manager
    for other in (with_fast, run_with_previews(engine, request, None)):
        assert np.array_equal(pixels(with_taesd), pixels(other))
    # the last TAESD preview is the finished image drawn by the tiny decoder: close to the VAE's
    difference = np.abs(np.asarray(taesd[-1], dtype=np.float64) - pixels(with_taesd) * 255).mean()
    assert difference < 12, difference


def test_taesd_falls_back_to_fast_where_the_preset_has_none_here(engines, monkeypatch):
    """TAESD asks for the best preview there is: a preset whose TAESD is not downloaded on an offline server, or a
    folder that is not there, previews Fast, without a refusal; a decoder that cannot be fetched online says so
    once, in the result's notes, and the image is made."""
    from studio.core.errors import ModelUnavailable
    from studio.models.preview_decoders import decoder_download, preview_decoder_of

    engine = engines.text_to_image
    sd15 = engine.presets.get("stable-diffusion-1.5")
    assert preview_decoder_of(sd15) == "madebyollin/taesd"
    assert decoder_download("madebyollin/taesd").allow_patterns == ("config.json", "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(engine.downloads, "is_offline", lambda: True)
    assert "is not downloaded and this server is offline" in engine.preview_decoders.problem(sd15)
    request = TextToImageRequest(prompt=PROMPT, preset="stable-diffusion-1.5", seed=1)
    assert engine.live_preview_plan(request, sd15) == dict(previews=True, preview_every=0, preview_decoder=None)
    missing = replace(engine.presets.get("embedded"), preview_decoder="/nowhere/taesd")
    assert engine.preview_decoders.problem(missing) == ("TAESD previews: the folder /nowhere/taesd has no config.json "
                                                       "or diffusion_pytorch_model.safetensors; choose Fast.")
    monkeypatch.setattr(engine.downloads, "is_offline", lambda: False)

    def unreachable(download, on_progress=None):
        raise ModelUnavailable("The Hub could not be reached.")

    monkeypatch.setattr(engine.downloads, "ensure", unreachable)
    plan = replace(engine.plan(TextToImageRequest(prompt=PROMPT, seed=2, steps=2)), preview_decoder="madebyollin/taesd")
    import contextlib

    with contextlib.ExitStack() as protected:
        fetched = engine.preview_decoders.fetched(plan, protected)
    assert fetched.preview_decoder is None
    assert fetched.warnings[-1].startswith("TAESD previews: madebyollin/taesd could not be fetched, so the previews "
                                           "were Fast ones (The Hub could not be reached.)")



def test_auto_keeps_the_previews_within_three_percent_of_the_pass(engines, monkeypatch):
    """AUTO (the default) spreads over a pass as many previews as fit in 3% of its time (projected from its steps
    so far), each in the middle of its share of the steps: with each preview taking 30 ms, a 100-step pass of
    2.5 s shows two, at steps 25 and 75 (after a server's first two, made at once to learn their cost). The pass
    runs on a clock of its own (25 ms a step, 30 ms a preview), so that a busy machine cannot move the steps."""
    import types

    import studio.tasks.previews as previews_module
    from studio.tasks.previews import PreviewCosts, latents_preview

    clock = [0.0]
    monkeypatch.setattr(previews_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(family, latents):
        clock[0] += 0.03
        return latents_preview(family, latents)

    monkeypatch.setattr(previews_module, "latents_preview", slow)
    engine = engines.text_to_image
    monkeypatch.setattr(engine, "preview_costs", PreviewCosts())
    request = TextToImageRequest(prompt=PROMPT, seed=6, steps=100, live_preview="Fast")

    def step_done(done, total, text):
        clock[0] += 0.025
        steps.append(done)

    for run in range(2):
        steps: list[int] = []
        job = LocalJob(step_done, on_preview=lambda image, part: steps.append(-1))
        with engine.model_files(engine.plan(request)) as plan:
            engine.run(plan, job)
        # each preview is made before its step is reported: the report after it says which step
        shown_at = [steps[index + 1] for index, step in enumerate(steps) if step == -1]
        if run == 0:
            assert shown_at[:2] == [1, 2]  # nothing known of their cost yet
            continue
        assert shown_at == [25, 75]
    assert engine.preview_costs.expected("Fast", 16 * 16) == pytest.approx(0.03)


def test_auto_measures_again_after_a_slow_preview_and_one_outlier_does_not_decide():
    from studio.tasks.previews import PreviewCosts

    costs = PreviewCosts()
    for seconds in (9.0, 0.004, 0.005, 2.0, 0.004):  # the first, a warm-up, is not counted
        costs.record("Fast", 256, seconds)
    assert costs.expected("Fast", 256) == pytest.approx(0.0045)  # the median: the 2 s one does not decide
    assert costs.expected("Fast", 1024) == 0.0 and costs.expected("TAESD", 256) == 0.0  # per kind and size


def test_hires_fix_shows_both_passes_forming_the_second_at_the_larger_size(engines):
    """Each image's two passes: TAESD previews at 64 px through the first pass, then at Hires. fix's 128 px."""
    from studio.tasks.hires import HiresFix

    request = TextToImageRequest(prompt=PROMPT, seed=9, steps=3, width=64, height=64, preview_every=1,
                                 hires=HiresFix(upscale=2.0, upscaler="Latent", steps=2, denoising_strength=0.5))
    previews: list[Image.Image] = []
    run_with_previews(engines.text_to_image, request, previews)
    assert [image.size for image in previews] == [(64, 64)] * 3 + [(128, 128)] * 2


def test_a_taesd_that_cannot_be_loaded_costs_the_image_nothing(tmp_path):
    """A preset's TAESD folder with its files but broken weights: the image is made, its previews are Fast ones,
    and the next plans no longer ask for that decoder."""
    import shutil

    from studio.models.presets import PresetCatalog, load_presets
    from studio.tasks.engines import local_engines

    broken = tmp_path / "taesd"
    broken.mkdir()
    shutil.copy(ROOT / "models" / "embedded-taesd" / "config.json", broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    presets = load_presets()
    embedded = replace(presets.get("embedded"), preview_decoder=str(broken))
    engine = local_engines(PresetCatalog([embedded], default="embedded")).text_to_image
    request = TextToImageRequest(prompt=PROMPT, seed=3, steps=3, preview_every=1)
    assert engine.plan(request).preview_decoder == str(broken)  # its files are there
    previews: list[Image.Image] = []
    result = run_with_previews(engine, request, previews)
    assert len(result.images) == 1 and [image.size for image in previews] == [(16, 16)] * 3  # Fast ones
    assert engine.plan(request).preview_decoder is None
    assert "could not be loaded here" in engine.preview_decoders.problem(embedded)

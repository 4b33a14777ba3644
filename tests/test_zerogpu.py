"""ZeroGPU, emulated the way spaces runs it: the @spaces.GPU function in a *forked* worker process that is kept
for later calls, its arguments and result crossing queues. Stop and progress must cross the fork, results must
come back, the booking must come from the job's estimate, and nothing may load inside the worker."""

import contextlib
import multiprocessing
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import app
from components.running import JobRunner
from studio.a1111.metadata import parse_parameters
from studio.core.errors import InvalidRequest
from studio.core.jobs import JobBoard
from studio.evaluation.compare import CompareRequest
from studio.evaluation.model_kinds import clip_key
from studio.models.controlnets import ControlNetCatalog, ControlNetPreset
from studio.models.upscalers import ReleaseFiles, load_upscalers
from studio.tasks.control import ControlUnit
from studio.tasks.generation import TextToImageRequest
from studio.tasks.hires import HiresFix
from studio.tasks.upscaling import UpscaleRequest, Upscaling


class ForkingGpu:
    """A stand-in for `spaces.GPU` that does what spaces' zero/wrappers.py does on a Space: a worker started with
    a fork context on the first call and reused after; (args, kwargs) in, the result (or the error) out."""

    def __init__(self, observe):
        self.observe = observe  # run in the worker after each call; its value comes back too
        self.bookings: list[float] = []
        self.workers: list = []
        self.observed: list = []

    def GPU(self, duration):  # noqa: N802 - the name spaces uses
        def decorate(task):
            context = multiprocessing.get_context("fork")
            worker = {}

            def handler(*args, **kwargs):
                self.bookings.append(duration(*args, **kwargs))
                if not worker:
                    arguments, results = context.SimpleQueue(), context.SimpleQueue()
                    process = context.Process(target=serve, args=(task, arguments, results, self.observe), daemon=True)
                    process.start()
                    worker.update(process=process, arguments=arguments, results=results)
                    self.workers.append(process)
                worker["arguments"].put((args, kwargs))
                kind, value, observed = worker["results"].get()
                self.observed.append(observed)
                if kind == "error":
                    raise RuntimeError(value)
                return value

            return handler

        return decorate


@contextlib.contextmanager
def emulated_spaces(observe):
    """app's `spaces` is a ForkingGpu for the block (`observe` runs in its worker after each call); its workers
    are killed after."""
    fake = ForkingGpu(observe)
    original = getattr(app, "spaces", None)
    app.spaces = fake
    try:
        yield fake
    finally:
        for process in fake.workers:
            process.kill()
        if original is None:
            del app.spaces
        else:
            app.spaces = original


def serve(task, arguments, results, observe):
    torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork; a GPU worker does its work in CUDA
    while True:
        args, kwargs = arguments.get()
        try:
            results.put(("ok", task(*args, **kwargs), observe()))
        except Exception:  # noqa: BLE001
            results.put(("error", traceback.format_exc(), observe()))


@pytest.fixture(scope="module")
def zerogpu(tmp_path_factory, app_loras):
    """The studio as app.py builds it on ZeroGPU: every offered preset preloaded in the main process, the GPU
    function behind (a stand-in for) spaces.GPU."""
    studio = app.build_studio(app.parse_args(["--device", "cpu", "--loras-dir", str(app_loras)]))
    engine = studio.text_to_image
    assert app.preload_preset(studio.manager, engine.models, engine.downloads, engine.presets.get("embedded"), pin=True)
    files = ReleaseFiles(tmp_path_factory.mktemp("release-files"), offline=True)  # no Real-ESRGAN file here
    studio.upscaling = Upscaling(studio.manager, app.preload_upscalers(studio.manager, load_upscalers(), files), files)
    engine.upscaling = studio.upscaling  # Hires. fix's upscalers: those placed at start
    studio.manager.preload({"clip": clip_key(studio.comparison.clip.source)}, pin=True)  # as app.py does on ZeroGPU
    # the LoRAs placed at start for the presets they fit, as app.py does on ZeroGPU
    local = engine.loras.only(["test-shapes"])  # the Hub LoRAs of presets/loras.yaml: never a download in a test
    engine.loras = app.preload_loras(studio.manager, engine.models, engine.downloads, engine.presets, local)
    # the ControlNets of the offered families placed at start, as app.py does on ZeroGPU (one whose folder is
    # missing is not offered)
    from tiny_models import EMBEDDED, save_random_controlnet

    folder = save_random_controlnet(EMBEDDED, tmp_path_factory.mktemp("controlnet") / "cn", seed=1)
    catalog = ControlNetCatalog([ControlNetPreset("tiny-cn", "Tiny", "embedded", local=folder),
                                 ControlNetPreset("missing-cn", "Missing", "embedded", local=folder.parent / "none")])
    engine.controlnets = studio.inpainter.controlnets = app.preload_controlnets(
        studio.manager, engine.downloads, engine.presets, catalog)
    # the live previews' TAESDs placed at start (the embedded one; the Hub presets', not downloaded, turned off)
    engine.presets = studio.inpainter.presets = app.preload_preview_decoders(studio.manager, engine.downloads,
                                                                             engine.presets)
    loads_before = studio.manager.loads
    with emulated_spaces(observe=lambda: studio.manager.loads - loads_before) as fake:
        runner = JobRunner(board=JobBoard(slots=8), gpu=app.zerogpu_wrapper(studio.manager))
        on_device = runner.device_function("text_to_image", engine)
        # every tab registers its engine before the first job, as build_ui does: a worker forked later would not
        # know an engine registered after it
        runner.device_function("upscale", studio.upscaling)
        runner.device_function("compare", studio.comparison)
        runner.device_function("inpaint", studio.inpainter)
        yield studio, runner, on_device, fake


def test_controlnets_are_placed_at_start_and_a_unit_runs_in_the_worker_without_loading(zerogpu):
    studio, runner, on_device, fake = zerogpu
    engine = studio.text_to_image
    assert engine.controlnets.names == ["tiny-cn"]  # the missing one is not offered
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).rectangle((30, 30, 56, 56), outline="black", width=3)
    plan = engine.plan(request(controls=(ControlUnit("tiny-cn", drawing, "invert"),)))
    job = runner.board.open("visitor", "text-to-image")
    with engine.model_files(plan) as plan:
        result = on_device(plan, job.slot)
    runner.board.close(job)
    assert fake.observed[-1] == 0  # nothing loaded in the worker: the ControlNet was there already
    assert "ControlNet 0" in result.images[0].parameters


def request(**changes):
    values = dict(prompt="a red circle on a blue background", preset="embedded", scheduler="Euler", steps=12,
                  guidance_scale=3.0, width=64, height=64, seed=21)
    return TextToImageRequest(**(values | changes))


def test_results_come_back_from_the_forked_worker_and_nothing_loads_there(zerogpu):
    studio, runner, on_device, fake = zerogpu
    plan = studio.text_to_image.plan(request(batch_size=2))
    job = runner.board.open("visitor", "text-to-image")
    with studio.text_to_image.model_files(plan) as plan:  # as the app runs it: model files (and hash) first, in this process
        result = on_device(plan, job.slot)
    runner.board.close(job)
    assert fake.workers and fake.workers[0].pid != multiprocessing.current_process().pid
    assert result.seeds == [21, 22] and result.images[0].image.size == (64, 64)
    here = studio.text_to_image.generate(request(batch_size=2))
    # the same image; the worker runs one thread (as a GPU worker leaves the CPU alone), this process two, and
    # float sums in another order may round a pixel one level apart
    difference = np.abs(np.asarray(result.images[1].image, dtype=int) - np.asarray(here.images[1].image, dtype=int))
    assert difference.max() <= 2, difference.max()
    assert "Seed: 22" in result.images[1].image.info["parameters"]
    # the model hash, read in this process before the device work, crossed into the worker with the plan
    assert parse_parameters(result.images[1].parameters).model_hash == parse_parameters(here.images[1].parameters).model_hash
    assert plan.model_hash and len(plan.model_hash) == 10
    assert fake.observed[-1] == 0  # no model was loaded inside the worker
    assert studio.manager.loading_allowed  # the main process's manager is untouched


def test_the_booking_is_the_jobs_own_estimate(zerogpu):
    studio, runner, on_device, fake = zerogpu
    small = studio.text_to_image.plan(request(steps=20))
    large = studio.text_to_image.plan(request(steps=100, batch_size=8))
    for plan in (small, large):
        job = runner.board.open("visitor", "text-to-image")
        on_device(plan, job.slot)
        runner.board.close(job)
    assert fake.bookings[-2:] == [small.gpu_seconds, large.gpu_seconds]
    assert small.gpu_seconds <= 10  # seconds for the embedded model, not 30 + steps × batch
    assert large.gpu_seconds > small.gpu_seconds


def test_stop_and_progress_cross_the_fork(zerogpu):
    studio, runner, on_device, fake = zerogpu
    plan = studio.text_to_image.plan(request(steps=100, batch_size=8))
    job = runner.board.open("visitor", "text-to-image")
    other = runner.board.open("visitor", "inpaint")  # the same visitor's other tab
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", on_device(plan, job.slot)))
    worker.start()
    seen = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1][0] < 5:  # progress written in the worker, read here
        assert time.monotonic() < deadline, "no progress came back from the worker"
        seen.append(job.progress())
        time.sleep(0.02)
    assert runner.board.cancel("visitor", "text-to-image") == 1
    worker.join(timeout=60)
    result = outcome["result"]
    assert result.interrupted and len(result.images) < 8
    assert seen[-1][1] == plan.total_steps == 800
    assert not other.cancelled  # Stop in one tab leaves the other tab's job alone
    runner.board.close(job)
    runner.board.close(other)


def test_an_upscale_runs_in_the_same_gpu_function_and_nothing_loads_there(zerogpu):
    """On ZeroGPU the upscalers are placed at start, the ones whose files are missing are not offered, and an
    upscale runs in the same forked worker as the images (one GPU function per manager)."""
    studio, runner, on_device, fake = zerogpu
    upscaling = studio.upscaling
    assert set(upscaling.catalog.names) == {"embedded-rrdbnet-x4", "lanczos"}
    upscale_on_device = runner.device_function("upscale", upscaling)
    assert upscale_on_device.gpu is on_device.gpu  # the images' GPU function, bound to the Upscale engine
    image = Image.new("RGB", (40, 30), (40, 90, 200))
    plan = upscaling.plan(image, UpscaleRequest("embedded-rrdbnet-x4", 2))
    job = runner.board.open("visitor", "upscale")
    result = upscale_on_device(plan, job.slot)
    runner.board.close(job)
    here = upscaling.upscale(image, UpscaleRequest("embedded-rrdbnet-x4", 2))
    assert result.image.size == (80, 60) and result.image.info["postprocessing"].startswith("Postprocess upscale by: 2")
    assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(here.image, dtype=int)).max() <= 2
    assert fake.observed[-1] == 0  # no model was loaded inside the worker


def test_hires_fix_runs_both_passes_and_its_upscaler_in_the_worker_and_nothing_loads_there(zerogpu):
    """Hires. fix's upscaler is one of those placed at start; its second pass leases the same models."""
    studio, runner, on_device, fake = zerogpu
    engine = studio.text_to_image
    hires = HiresFix(upscaler="embedded-rrdbnet-x4", steps=8)
    plan = engine.plan(request(hires=hires))
    job = runner.board.open("visitor", "text-to-image")
    with engine.model_files(plan) as plan:
        result = on_device(plan, job.slot)
    runner.board.close(job)
    here = engine.generate(request(hires=hires))
    assert result.images[0].image.size == (128, 128)
    assert "Hires upscaler: embedded-rrdbnet-x4" in result.images[0].parameters
    difference = np.abs(np.asarray(result.images[0].image, dtype=int) - np.asarray(here.images[0].image, dtype=int))
    assert difference.max() <= 3, difference.max()
    assert fake.observed[-1] == 0  # no model was loaded inside the worker
    with pytest.raises(InvalidRequest, match="Unknown hires upscaler 'RealESRGAN_x4plus'"):
        engine.plan(request(hires=HiresFix(upscaler="RealESRGAN_x4plus")))  # its file is not here: not offered


def test_a_compare_grid_runs_in_the_worker_with_its_clip_scores_and_stop_keeps_finished_cells(zerogpu):
    """A grid is one job: its cells and CLIP scores in one GPU call, its progress and Stop across the fork."""
    studio, runner, _, fake = zerogpu
    comparison = studio.comparison
    on_device = runner.device_function("compare", comparison)  # the same GPU function, bound to the Compare engine
    grid = CompareRequest(prompt="a red circle on a blue background", seed=5, x_type="Sampler",
                          x_values="Euler, DDIM", y_type="Steps", y_values="6, 12")
    plan = comparison.plan(grid)
    job = runner.board.open("visitor", "compare")
    with comparison.model_files(plan) as plan:
        result = on_device(plan, job.slot)
    runner.board.close(job)
    assert fake.observed[-1] == 0  # no model was loaded inside the worker, the CLIP neither
    assert [(c.cell.x, c.cell.y) for c in result.cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(c.image is not None and 0 < c.clip_score <= 100 for c in result.cells)
    assert result.clip_label == comparison.clip.label and len(result.grids()) == 1
    here = comparison.compare(grid)
    for there, local in zip(result.cells, here.cells):
        assert parse_parameters(there.image.parameters).sampler == parse_parameters(local.image.parameters).sampler
        difference = np.abs(np.asarray(there.image.image, dtype=int) - np.asarray(local.image.image, dtype=int))
        assert difference.max() <= 2, difference.max()
        assert abs(there.clip_score - local.clip_score) < 0.5

    # Stop, pressed in this process while the worker runs the grid: the cells finished before it are kept
    long_grid = CompareRequest(prompt="a red circle on a blue background", seed=5, x_type="Steps",
                               x_values="60, 60, 60, 60")
    plan = comparison.plan(long_grid)
    job = runner.board.open("visitor", "compare")
    outcome = {}
    with comparison.model_files(plan) as plan:
        worker = threading.Thread(target=lambda: outcome.update(result=on_device(plan, job.slot)))
        worker.start()
        deadline = time.monotonic() + 120
        while job.progress()[0] < 70:  # into the second cell (each cell is 60 steps)
            assert time.monotonic() < deadline, "no progress came back from the worker"
            time.sleep(0.02)
        assert job.progress()[1] == plan.total_steps == 240  # one total for the grid
        assert runner.board.cancel("visitor", "compare") == 1
        worker.join(120)
    runner.board.close(job)
    stopped = outcome["result"]
    assert stopped.interrupted
    kept = [c for c in stopped.cells if c.image is not None]
    assert 1 <= len(kept) < 4, [c.image for c in stopped.cells]


def test_a_lora_is_placed_at_start_applied_in_the_worker_and_removed_there(zerogpu):
    """On ZeroGPU the LoRAs are placed with the presets at start (nothing may load in the worker); the worker keeps
    its models between calls, so a LoRA must leave them as they were there too."""
    studio, runner, on_device, fake = zerogpu
    engine = studio.text_to_image
    assert "test-shapes" in engine.loras.names

    def in_worker(prompt):
        plan = engine.plan(request(prompt=prompt))
        job = runner.board.open("visitor", "text-to-image")
        with engine.model_files(plan) as plan:
            result = on_device(plan, job.slot)
        runner.board.close(job)
        return result.images[0]

    with_lora = in_worker("a red circle on a blue background <lora:test-shapes:1>")
    plain = in_worker("a red circle on a blue background")
    assert fake.observed[-1] == 0  # the LoRA was not loaded in the worker
    assert "Lora hashes: " in with_lora.parameters and "Lora hashes" not in plain.parameters
    here = engine.generate(request(prompt="a red circle on a blue background"))
    difference = np.abs(np.asarray(plain.image, dtype=int) - np.asarray(here.images[0].image, dtype=int))
    assert difference.max() <= 2  # the worker's models carry no LoRA after the call that had one
    assert np.abs(np.asarray(with_lora.image, dtype=int) - np.asarray(plain.image, dtype=int)).mean() > 2


def test_live_previews_cross_the_fork_and_the_streamed_result_is_the_plain_one(zerogpu):
    """The generator handlers' path on ZeroGPU: previews made in the forked worker reach the main process through
    the job board's preview lanes (text to image, a Compare grid filling in), and the image is the one made
    without previews."""
    studio, runner, on_device, fake = zerogpu
    engine = studio.text_to_image
    quiet = lambda *args, **kwargs: None  # noqa: E731 - gradio's Progress, unused outside a page
    outputs = []
    for gallery, seeds, info in runner.stream("text-to-image", None, quiet, engine,
                                              lambda: engine.plan(request(steps=100, preview_every=10)),
                                              on_device):
        if isinstance(gallery[0][0], str):  # a preview's file, read now (its job's folder goes with the job)
            gallery = [(Image.open(gallery[0][0]).copy(), gallery[0][1])]
        outputs.append((gallery, seeds, info))
    previews = [gallery[0] for gallery, _, _ in outputs[:-1]]
    assert len(previews) >= 3 and all(caption.startswith("Forming… Image 1/1, step ") for _, caption in previews)
    assert all(image.size == (64, 64) for image, _ in previews)  # decoded by the embedded TAESD, placed at start
    assert len({image.tobytes() for image, _ in previews}) >= 2
    streamed = outputs[-1][0][0][0]
    plain = runner.run("text-to-image", None, quiet, engine, lambda: engine.plan(request(steps=100)), on_device)
    assert np.array_equal(np.asarray(streamed), np.asarray(plain[0][0][0]))
    assert fake.observed[-1] == 0  # nothing loaded in the worker

    comparison = studio.comparison
    grids = list(runner.stream_job(
        "compare", None, quiet, comparison,
        lambda: comparison.plan(CompareRequest(prompt="a red circle", seed=3, x_type="Steps", x_values="60, 80")),
        runner.device_function("compare", comparison), "Cannot compare",
        lambda shown, caption, part: Image.open(shown).copy(),
        lambda plan, result: result))
    assert len(grids) >= 3 and grids[-1].cells[1].image is not None
    assert all(grid.width > grid.height for grid in grids[:-1])  # the two cells side by side, forming


def test_soft_inpainting_and_an_outpaint_cross_the_fork(zerogpu):
    """The soft blend's mask goes into the worker with the plan; each image's latent distance comes back with it,
    and the paste-back in this process gives the image a local run gives."""
    from studio.tasks.inpainting import InpaintRequest
    from studio.tasks.outpainting import Outpaint
    from studio.tasks.soft_inpainting import SoftInpainting

    studio, runner, _, fake = zerogpu
    inpainter = studio.inpainter
    on_inpaint = runner.device_function("inpaint", inpainter)
    picture, mask = Image.new("RGB", (64, 64), (30, 60, 200)), Image.new("L", (64, 64), 0)
    ImageDraw.Draw(picture).ellipse((30, 20, 80, 50), fill=(220, 30, 30))
    mask.paste(255, (16, 16, 40, 40))
    soft = InpaintRequest(prompt="a large yellow star on a blue background", seed=5, steps=8, mask_blur=4,
                          soft=SoftInpainting(), outpaint=Outpaint(right=16), live_preview="Off")
    plan, finishing = inpainter.plan_inpaint(picture, mask, soft)
    job = runner.board.open("visitor", "inpaint")
    with inpainter.model_files(plan) as plan:
        result = inpainter.finish_inpaint(finishing, on_inpaint(plan, job.slot))
    runner.board.close(job)
    assert fake.observed[-1] == 0
    assert result.images[0].latent_distance is not None and result.images[0].image.size == (80, 64)
    here = inpainter.inpaint(picture, mask, soft).images[0].image
    difference = np.abs(np.asarray(result.images[0].image, dtype=int) - np.asarray(here, dtype=int))
    assert difference.max() <= 2, difference.max()

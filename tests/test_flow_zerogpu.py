"""SD 3 and FLUX.1 on (emulated) ZeroGPU: the preset placed at start in the main process, the job run in the forked
GPU worker without loading anything there, the image the one this process makes, and the booking counting FLUX's
true CFG as a second evaluation per step."""

import multiprocessing

import numpy as np
import pytest
import yaml
from test_zerogpu import emulated_spaces
from tiny_flow_models import save_tiny_flux, save_tiny_sd3

import app
from components.running import JobRunner
from studio.a1111.metadata import parse_parameters
from studio.core.jobs import JobBoard
from studio.tasks.generation import TextToImageRequest

SIZE = dict(description="a tiny random-weight test model", default_steps=4, default_guidance=1.0, default_width=64,
            default_height=64, min_size=32, max_size=128, size_step=16, default_scheduler="Euler",
            seconds_per_step=0.5)


@pytest.fixture(scope="module")
def zerogpu(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-zerogpu")
    presets = {"default": "tiny-flux", "presets": {
        "tiny-flux": {"label": "Tiny FLUX dev", "local": str(save_tiny_flux(root / "flux")), "family": "flux",
                      "distilled_guidance": 3.5, **SIZE},
        "tiny-sd3": {"label": "Tiny SD 3", "local": str(save_tiny_sd3(root / "sd3")), "family": "sd3", **SIZE}}}
    (root / "models.yaml").write_text(yaml.safe_dump(presets))
    studio = app.build_studio(app.parse_args(["--device", "cpu", "--presets-file", str(root / "models.yaml"),
                                              "--loras-dir", str(root / "no-loras")]))
    engine = studio.text_to_image
    for name in ("tiny-flux", "tiny-sd3"):
        assert app.preload_preset(studio.manager, engine.models, engine.downloads, engine.presets.get(name), pin=True)
    loads_before = studio.manager.loads
    with emulated_spaces(observe=lambda: studio.manager.loads - loads_before) as fake:
        runner = JobRunner(board=JobBoard(slots=4), gpu=app.zerogpu_wrapper(studio.manager))
        yield studio, runner, runner.device_function("text_to_image", engine), fake


def request(**changes):
    return TextToImageRequest(**(dict(prompt="a red circle", preset="tiny-flux", steps=4, guidance_scale=1.0,
                                      width=64, height=64, seed=8, live_preview="Off") | changes))


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sd3"])
def test_a_flow_model_runs_in_the_forked_worker_without_loading(zerogpu, preset):
    studio, runner, on_device, fake = zerogpu
    job = runner.board.open("visitor", "text-to-image")
    with studio.text_to_image.model_files(studio.text_to_image.plan(request(preset=preset))) as plan:
        result = on_device(plan, job.slot)
    runner.board.close(job)
    assert fake.workers[0].pid != multiprocessing.current_process().pid and fake.observed[-1] == 0
    here = studio.text_to_image.generate(request(preset=preset)).images[0].image
    difference = np.abs(np.asarray(result.images[0].image, dtype=int) - np.asarray(here, dtype=int))
    assert difference.max() <= 2  # one thread there, two here: sums in another order
    assert ("Distilled CFG Scale" in parse_parameters(result.images[0].parameters).extra) == (preset == "tiny-flux")


def test_true_cfg_books_a_second_evaluation_per_step(zerogpu):
    studio = zerogpu[0]
    plain = studio.text_to_image.plan(request(steps=20))
    true_cfg = studio.text_to_image.plan(request(steps=20, guidance_scale=3.5))
    assert true_cfg.gpu_seconds > plain.gpu_seconds
    sd3 = studio.text_to_image.plan(request(preset="tiny-sd3", steps=20, guidance_scale=3.5))
    assert sd3.gpu_seconds == plain.gpu_seconds  # SD 3's CFG halves run as one batch, in its seconds_per_step

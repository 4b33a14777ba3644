"""The Compare engine: an X/Y/Z grid of the embedded model as one job (checked first, one seed, each cell's full
parameters, one progress total, Stop keeps finished cells, CLIP scores, the labelled grid)."""

import threading

import numpy as np
import pytest
import torch

from studio.a1111.metadata import parse_parameters
from studio.core.errors import InvalidRequest
from studio.evaluation.compare import CompareLimits, CompareRequest, Comparison
from studio.evaluation.metrics import ClipScorer
from studio.evaluation.model_kinds import CLIP, ClipLoader
from studio.models.loras import LoraCatalog
from studio.models.presets import load_presets
from studio.tasks.engines import ManagerSettings, build_engines, build_manager
from studio.tasks.generation import TextToImageRequest
from tests.conftest import ROOT

PROMPT = "a large red circle in the center on a blue background"


@pytest.fixture(scope="module")
def comparison():
    presets = load_presets()
    manager, models = build_manager(presets, ManagerSettings(device_budget=4 * 1024**3, dtype=torch.float32,
                                                             extra_loaders={CLIP: ClipLoader()}))
    engine = build_engines(manager, models, presets, loras=LoraCatalog({}), version="Diffusion Studio test").text_to_image
    return Comparison(engine, ClipScorer(manager, ROOT / "models" / "embedded-clip", "embedded CLIP"),
                      CompareLimits(max_cells=16))


def two_by_two(**changes):
    values = dict(prompt=PROMPT, seed=5, x_type="Sampler", x_values="Euler, DDIM", y_type="Steps", y_values="8, 12")
    return CompareRequest(**(values | changes))


def test_a_2x2_grid_gives_each_cell_with_its_parameters_one_seed_and_clip_scores(comparison, artifacts):
    result = comparison.compare(two_by_two())
    assert not result.interrupted and len(result.cells) == 4
    for cell in result.cells:
        params = parse_parameters(cell.image.parameters)
        assert params.scheduler == ["Euler", "DDIM"][cell.cell.x] and params.steps == [8, 12][cell.cell.y]
        assert params.seed == 5 and cell.image.image.size == (64, 64)
        assert 0 < cell.clip_score <= 100
    assert result.clip_label == "embedded CLIP"
    # the cells differ (different samplers), and a cell is the image Text to image makes with its settings
    pixels = [np.asarray(cell.image.image) for cell in result.cells]
    assert not np.array_equal(pixels[0], pixels[1])
    alone = comparison.text_to_image.generate(TextToImageRequest(prompt=PROMPT, scheduler="DDIM", steps=12, seed=5,
                                                                 guidance_scale=3.0, width=64, height=64))
    assert np.array_equal(pixels[3], np.asarray(alone.images[0].image))
    grids = result.grids()
    assert len(grids) == 1 and grids[0].width > 2 * 128 and grids[0].height > 2 * 128
    grids[0].save(artifacts / "compare_grid.png")


def test_a_z_axis_makes_one_grid_per_value_and_seed_can_be_an_axis(comparison):
    result = comparison.compare(CompareRequest(prompt=PROMPT, seed=5, x_type="Seed", x_values="1-2",
                                               z_type="CFG Scale", z_values="2, 4"))
    assert len(result.cells) == 4 and len(result.grids()) == 2
    assert {parse_parameters(cell.image.parameters).seed for cell in result.cells} == {1, 2}


def test_everything_is_checked_before_anything_runs(comparison):
    loads = comparison.manager.loads
    with pytest.raises(InvalidRequest, match="Sampler: unknown value 'DPM fast'"):
        comparison.plan(two_by_two(x_values="Euler, DPM fast"))
    with pytest.raises(InvalidRequest) as refused:
        comparison.plan(two_by_two(y_values="8, 500"))
    assert "Steps must be between 1 and 100" in str(refused.value) and "(Sampler: Euler, Steps: 500)" in str(refused.value)
    with pytest.raises(InvalidRequest, match="That grid has 25 cells; the limit here is 16"):
        comparison.plan(two_by_two(x_type="Steps", x_values="1-5", y_type="CFG Scale", y_values="1-5"))
    with pytest.raises(InvalidRequest, match="Enter a prompt"):
        comparison.plan(two_by_two(prompt=" "))
    assert comparison.manager.loads == loads


def test_one_progress_total_and_stop_keeps_the_finished_cells(comparison):
    seen, cancel = [], threading.Event()

    def on_progress(done, total, text):
        seen.append((done, total, text))
        if text.startswith("Cell 3/4"):
            cancel.set()

    result = comparison.compare(two_by_two(), on_progress=on_progress, cancel=cancel)
    assert {total for _, total, _ in seen} == {8 + 8 + 12 + 12}
    done = [step for step, _, _ in seen]
    assert done == sorted(done)
    # two cells finished; the third, cut short, is left empty (its half-denoised image is not a result)
    assert result.interrupted and [cell.image is not None for cell in result.cells] == [True, True, False]
    assert len(result.grids()) == 1  # the grid is drawn with the cells that were made


def test_stop_before_the_first_cell_gives_an_empty_grid_not_an_error(comparison):
    cancel = threading.Event()
    cancel.set()
    result = comparison.compare(two_by_two(), cancel=cancel)
    assert result.interrupted and result.cells == []
    grid = result.grids()[0]
    assert grid.width >= 2 * 128  # the headers, with empty cells


def test_a_preset_axis_gives_each_cell_its_presets_own_defaults(comparison):
    plan = comparison.plan(CompareRequest(prompt=PROMPT, seed=3, x_type="Preset",
                                          x_values="embedded, stable-diffusion-1.5"))
    sizes = {cell_plan.preset.name: cell_plan.size for cell_plan in plan.plans}
    assert sizes == {"embedded": (64, 64), "stable-diffusion-1.5": (512, 512)}


def test_minus_one_on_a_seed_axis_is_drawn_before_running_and_named(comparison):
    plan = comparison.plan(CompareRequest(prompt=PROMPT, x_type="Seed", x_values="-1, -1, 7"))
    seeds = plan.grid.x.values
    assert -1 not in seeds and seeds[2] == 7 and seeds[0] != seeds[1]
    assert [cell_plan.seed for cell_plan in plan.plans] == list(seeds)


def test_a_plan_crosses_a_process_boundary(comparison):
    import pickle

    plan = comparison.plan(CompareRequest(prompt=PROMPT, seed=3, x_type="Hires upscale", x_values="1.5, 2"))
    again = pickle.loads(pickle.dumps(plan))
    assert [p.hires.size for p in again.plans] == [(96, 96), (128, 128)] and again.gpu_seconds == plan.gpu_seconds

"""A few steps of every training loop, resuming, and loading what they export through the studio's own path."""

import dataclasses
import json
import os

import pytest
import torch

from studio.core.model_records import ModelKey
from studio.embedded.family import SMOKE_PLAN, train
from studio.embedded.stages import VaeStage
from studio.models.presets import PresetCatalog, load_presets
from studio.tasks.engines import local_engines
from studio.tasks.generation import TextToImageRequest


@pytest.fixture(scope="module")
def smoke_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    results = train(root / "run", root / "models", SMOKE_PLAN)
    return root, results


def test_every_stage_trains_logs_and_exports(smoke_family):
    root, results = smoke_family
    assert [result.name for result in results] == ["clip", "vae", "unet", "multisize", "inpaint", "upscaler"]
    for result in results:
        assert result.steps == SMOKE_PLAN[result.name].steps
        losses = (root / "run" / result.name / "losses.csv").read_text().splitlines()
        assert len(losses) == result.steps
        assert json.loads((root / "run" / result.name / "done.json").read_text())["name"] == result.name
    models = root / "models"
    for path in ("embedded-clip/model.safetensors", "embedded-clip/vocab.json", "embedded-clip/merges.txt",
                 "embedded-sd/model_index.json", "embedded-sd/unet/diffusion_pytorch_model.safetensors",
                 "embedded-sd/tokenizer/merges.txt", "embedded-sd-inpainting/unet/config.json",
                 "embedded-upscaler/RRDBNet_x4.safetensors"):
        assert (models / path).exists(), path
    inpaint_config = json.loads((models / "embedded-sd-inpainting/unet/config.json").read_text())
    assert inpaint_config["in_channels"] == 9


def test_finished_stages_are_skipped(smoke_family):
    root, results = smoke_family
    again = train(root / "run", root / "models", SMOKE_PLAN)
    assert [r.seconds for r in again] == [r.seconds for r in results]


def test_stages_built_on_a_retrained_unet_are_trained_again(smoke_family):
    """Retraining the UNet (`--stage unet` after deleting its run) must not leave the multisize UNet, which the
    studio ships, built on the old one."""
    root, _ = smoke_family
    done = {name: root / "run" / name / "done.json" for name in ("unet", "multisize", "inpaint", "upscaler")}
    later = max(path.stat().st_mtime for path in done.values()) + 60
    os.utime(done["unet"], (later, later))  # as if the UNet had just been retrained
    before = {name: path.stat().st_mtime for name, path in done.items()}
    train(root / "run", root / "models", SMOKE_PLAN)
    after = {name: path.stat().st_mtime for name, path in done.items()}
    assert after["multisize"] > before["multisize"] and after["inpaint"] > before["inpaint"]
    assert after["unet"] == before["unet"] and after["upscaler"] == before["upscaler"]


class _InterruptedVae(VaeStage):
    save_every = 1
    calls = 0

    def loss(self, model, rng, generator):
        type(self).calls += 1
        if type(self).calls == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl+C during step 3
        return super().loss(model, rng, generator)


def test_an_interrupted_stage_resumes_where_it_stopped_as_if_never_stopped(tmp_path):
    straight = VaeStage(tmp_path / "a", tmp_path / "models-a", steps=4, batch_size=2)
    straight.save_every, straight.check_images = 1, 64  # the export's oracle check is not what this tests
    straight.run()

    interrupted = _InterruptedVae(tmp_path / "b", tmp_path / "models-b", steps=4, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert torch.load(tmp_path / "b" / "vae" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = VaeStage(tmp_path / "b", tmp_path / "models-b", steps=4, batch_size=2)
    resumed.save_every, resumed.check_images = 1, 64
    resumed.run()

    a = torch.load(tmp_path / "a" / "vae" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "vae" / "checkpoint.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert len((tmp_path / "b" / "vae" / "losses.csv").read_text().splitlines()) == 4


def test_exported_pipelines_load_through_the_presets_like_any_model(smoke_family):
    root, _ = smoke_family
    embedded = load_presets().get("embedded")
    preset = dataclasses.replace(
        embedded, local=root / "models" / "embedded-sd", inpaint_local=root / "models" / "embedded-sd-inpainting"
    )
    engine = local_engines(PresetCatalog([preset], "embedded")).text_to_image
    result = engine.generate(TextToImageRequest("a red circle", steps=2, seed=1))
    assert result.images[0].image.size == (64, 64)
    with engine.manager.use(engine.models.keys(preset, "inpaint")) as parts:
        assert parts["unet"].config.in_channels == 9
        assert parts["vae"] is engine.manager.loaded_object(ModelKey("diffusers", preset.source, "vae"))  # shared

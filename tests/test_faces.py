"""Face restoration after an upscale: offered only where GFPGAN's and facexlib's files are present (with their
sha256), hidden otherwise; the networks are leased from the manager and nothing is downloaded. The real weights
cannot be had here, so the files are random weights of the real architectures, listed with their own hashes."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.memory import ModelManager
from studio.models.basicsr_compat import install_functional_tensor_shim
from studio.models.faces import (
    FACE_RESTORER,
    FaceRestoration,
    FaceRestorerLoader,
    face_restorer_key,
    load_face_restorers,
)
from studio.models.upscalers import UPSCALER, ReleaseFiles, UpscalerLoader, load_upscalers
from studio.tasks.upscaling import UpscaleRequest, Upscaling

REAL = load_face_restorers()["GFPGANv1.4"]


def random_weight_files(folder: Path) -> dict[str, Path]:
    """GFPGAN v1.4 (clean, ×2 channels), RetinaFace ResNet-50 and ParseNet with random weights, saved as their
    release files are (GFPGAN's under `params_ema`). The detector's face/background head is zeroed, so that it
    finds no face (every score 0.5, under facexlib's 0.97): random weights would find faces anywhere."""
    install_functional_tensor_shim()
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    torch.manual_seed(0)
    gfpgan = GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                           fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                           sft_half=True)
    paths = {name: folder / name for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth")}
    torch.save({"params_ema": gfpgan.state_dict()}, paths["GFPGANv1.4.pth"])
    detector = RetinaFace(network_name="resnet50", device="cpu").state_dict()
    for name, value in detector.items():
        if name.startswith("ClassHead."):
            value.zero_()
    torch.save(detector, paths["detection_Resnet50_Final.pth"])
    torch.save(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict(), paths["parsing_parsenet.pth"])
    return paths


def presets_file(folder: Path, paths: dict[str, Path]) -> Path:
    """The studio's face_restorers entry, with these files' hashes and sizes instead of the official ones."""
    def pinned(path):
        return {"file": path.name, "url": f"https://example.invalid/{path.name}",
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}

    entry = {"label": "GFPGAN v1.4", "a1111_name": "GFPGAN", **pinned(paths["GFPGANv1.4.pth"]),
             "helpers": [pinned(paths["detection_Resnet50_Final.pth"]), pinned(paths["parsing_parsenet.pth"])]}
    path = folder / "upscalers.yaml"
    path.write_text(yaml.safe_dump({"face_restorers": {"GFPGANv1.4": entry}}))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(the folder's ReleaseFiles, which hash each file once; the presets listing them)"""
    folder = tmp_path_factory.mktemp("face-weights")
    presets = load_face_restorers(presets_file(folder, random_weight_files(folder)))
    return ReleaseFiles(folder, offline=True), presets


@pytest.fixture(scope="module")
def manager():
    loaders = {UPSCALER: UpscalerLoader(), FACE_RESTORER: FaceRestorerLoader()}
    return ModelManager(loaders, torch.device("cpu"), torch.float32, device_budget=8 * 1024**3)


def upscaling_with(manager, files, presets):
    return Upscaling(manager, load_upscalers(), files, faces=FaceRestoration(manager, presets, files))


def test_the_official_entry_pins_gfpgan_and_facexlibs_release_files():
    assert [f.name for f in REAL.files] == ["GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"]
    assert [f.size for f in REAL.files] == [348632874, 109497761, 85331193]
    assert REAL.file.sha256.startswith("e2cd4703ab14") and REAL.file.url.endswith("/v1.3.0/GFPGANv1.4.pth")


def test_offered_only_when_every_file_is_there_with_its_hash(weights, manager, tmp_path):
    files, presets = weights
    folder = files.cache_dir
    assert FaceRestoration(manager, presets, files).names == ["GFPGANv1.4"]
    # the official entry in an empty folder (as on this machine): not offered, and saying "None" still works
    empty = FaceRestoration(manager, {"GFPGANv1.4": REAL}, ReleaseFiles(tmp_path, offline=True))
    assert empty.names == [] and empty.check("None") == []
    assert "Face restoration is not available here" in empty.check("GFPGANv1.4")[0]
    # one helper missing: not offered (facexlib would download it)
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("GFPGANv1.4.pth", "parsing_parsenet.pth"):
        (partial / name).write_bytes((folder / name).read_bytes())
    assert FaceRestoration(manager, presets, ReleaseFiles(partial, offline=True)).names == []
    # a file that is not the pinned one: not offered
    (partial / "detection_Resnet50_Final.pth").write_bytes(b"not the detector")
    assert FaceRestoration(manager, presets, ReleaseFiles(partial, offline=True)).names == []


def test_no_face_found_gives_the_upscaled_image_and_says_so(weights, manager, monkeypatch):
    files, presets = weights
    import facexlib.utils.misc

    def no_download(*args, **kwargs):
        raise AssertionError("facexlib tried to download")

    # facexlib's load_file_from_url downloads through this name when a file is missing
    monkeypatch.setattr(facexlib.utils.misc, "download_url_to_file", no_download)
    upscaling = upscaling_with(manager, files, presets)
    picture = Image.new("RGB", (40, 32), (40, 90, 200))
    plain = upscaling.upscale(picture, UpscaleRequest("lanczos", 2))
    restored = upscaling.upscale(picture, UpscaleRequest("lanczos", 2, face_restoration="GFPGANv1.4"))
    assert np.array_equal(np.asarray(restored.image), np.asarray(plain.image))
    assert any("found no face" in warning for warning in restored.warnings)
    assert restored.image.info["postprocessing"].endswith("Postprocess upscaler: Lanczos, GFPGAN visibility: 1")
    assert any(model.kind == FACE_RESTORER for model in manager.status().models)  # leased from the manager


OFFSET = 128  # the face in the middle of a 512 px image: its 512 px crop covers about 230 px around it


def test_a_missing_helper_file_is_refused_before_facexlib_could_fetch_it(weights, tmp_path):
    files, presets = weights
    for name in ("GFPGANv1.4.pth", "parsing_parsenet.pth"):
        (tmp_path / name).write_bytes((files.cache_dir / name).read_bytes())
    key = face_restorer_key(presets["GFPGANv1.4"], ReleaseFiles(tmp_path, offline=True))
    with pytest.raises(ModelUnavailable, match=r"Face restoration needs detection_Resnet50_Final.pth in "):
        FaceRestorerLoader().load(key, torch.float32)
    assert not any(tmp_path.glob("*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "GFPGANv1.4.pth", "parsing_parsenet.pth"]  # nothing fetched or begun


def a_face(size=512):
    image = Image.new("RGB", (size, size), (200, 170, 150))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60 + OFFSET, 40 + OFFSET, 196 + OFFSET, 210 + OFFSET), fill=(230, 190, 160))
    for x in (100, 156):
        draw.ellipse((x - 10 + OFFSET, 100 + OFFSET, x + 10 + OFFSET, 114 + OFFSET), fill=(40, 30, 30))
    draw.rectangle((108 + OFFSET, 170 + OFFSET, 148 + OFFSET, 178 + OFFSET), fill=(150, 60, 60))
    return image


def test_a_found_face_is_restored_in_place_and_blended_by_visibility(weights, manager, monkeypatch):
    """The detector's landmarks are given (random weights find no face); alignment, GFPGAN, the parsed mask and the
    paste-back are facexlib's and the studio's own."""
    files, presets = weights
    from facexlib.utils.face_restoration_helper import FaceRestoreHelper

    landmarks = np.array([[100.0, 107.0], [156.0, 107.0], [128.0, 140.0], [110.0, 174.0], [146.0, 174.0]]) + OFFSET

    def found_one_face(helper, *args, **kwargs):
        helper.all_landmarks_5.append(landmarks)
        helper.det_faces.append(np.array([60 + OFFSET, 40 + OFFSET, 196 + OFFSET, 210 + OFFSET, 0.99]))
        return 1

    monkeypatch.setattr(FaceRestoreHelper, "get_face_landmarks_5", found_one_face)
    faces = FaceRestoration(manager, presets, files)
    picture = np.asarray(a_face())
    restored, count = faces.restore(picture, "GFPGANv1.4", 1.0)
    assert count == 1 and restored.shape == picture.shape
    changed = np.abs(restored.astype(int) - picture.astype(int)).max(axis=2) > 8
    assert changed[228:308, 228:284].mean() > 0.5  # the face is redrawn (random GFPGAN: noise, but there)
    assert not changed[:64].any() and not changed[:, :64].any()  # far from the face, the image is its own
    assert not changed[-64:].any() and not changed[:, -64:].any()
    half, _ = faces.restore(picture, "GFPGANv1.4", 0.5)
    expected = np.clip(picture * 0.5 + restored.astype(np.float32) * 0.5 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(half.astype(int) - expected.astype(int)).max() <= 1


def test_refused_clearly(weights, manager, tmp_path):
    files, presets = weights
    upscaling = upscaling_with(manager, files, presets)
    with pytest.raises(InvalidRequest, match="Unknown face restorer 'CodeFormer'. Available: None, GFPGANv1.4"):
        upscaling.plan(Image.new("RGB", (8, 8)), UpscaleRequest("lanczos", 2, face_restoration="CodeFormer"))
    with pytest.raises(InvalidRequest, match="Face visibility must be from 0 to 1"):
        upscaling.plan(Image.new("RGB", (8, 8)), UpscaleRequest("lanczos", 2, face_restoration="GFPGANv1.4",
                                                                  face_visibility=2))
    with pytest.raises(InvalidRequest, match="16-bit greyscale"):
        upscaling.plan(Image.new("I;16", (8, 8)), UpscaleRequest("lanczos", 2, face_restoration="GFPGANv1.4"))
    none_here = upscaling_with(manager, ReleaseFiles(tmp_path, offline=True), {"GFPGANv1.4": REAL})
    with pytest.raises(InvalidRequest, match="Face restoration is not available here"):
        none_here.plan(Image.new("RGB", (8, 8)), UpscaleRequest("lanczos", 2, face_restoration="GFPGANv1.4"))

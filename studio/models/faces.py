"""Face restoration after an upscale, as A1111's extras tab runs it (upscale first, then GFPGAN at a visibility):
GFPGAN v1.4 restores each face that facexlib's RetinaFace finds, aligned to 512 px, and facexlib pastes it back
through its ParseNet face mask.

A restorer is offered only where all its release files (GFPGAN's weights and facexlib's detector and parser) are in
the upscaler cache folder and match their pinned sha256; otherwise the option is hidden. Nothing here downloads:
facexlib fetches a missing detector by itself, so the files are checked first and facexlib is handed that folder.
The networks are one model of the ModelManager ("face_restorer"), leased like any other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.memory import ModelManager
from studio.core.model_records import ModelKey
from studio.models.basicsr_compat import install_functional_tensor_shim
from studio.models.presets import PRESETS_DIR
from studio.models.upscalers import ReleaseFile, ReleaseFiles, read_pth, release_file_from

FACE_RESTORER = "face_restorer"
FACE_SIZE = 512  # GFPGAN restores faces aligned to 512 × 512
DETECTION_SIDE = 640  # faces are looked for on the image with its shorter side at this (A1111 and CodeFormer do)
NO_FACE_RESTORATION = "None"
log = logging.getLogger("studio.models.faces")


@dataclass(frozen=True)
class FaceRestorerPreset:
    name: str
    label: str
    file: ReleaseFile  # GFPGAN's weights
    helpers: tuple[ReleaseFile, ...]  # facexlib's: RetinaFace (detection), ParseNet (face parsing)
    a1111_name: str = "GFPGAN"  # A1111 writes "GFPGAN visibility: 1"

    @property
    def files(self) -> tuple[ReleaseFile, ...]:
        return (self.file, *self.helpers)


def load_face_restorers(path: Path = PRESETS_DIR / "upscalers.yaml") -> dict[str, FaceRestorerPreset]:
    """The `face_restorers` section of the upscalers file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    restorers = {}
    for name, entry in (data.get("face_restorers") or {}).items():
        restorers[name] = FaceRestorerPreset(
            name=name, label=entry.get("label", name), file=release_file_from(entry),
            helpers=tuple(release_file_from(helper) for helper in entry.get("helpers", [])),
            a1111_name=entry.get("a1111_name", "GFPGAN"),
        )
    return restorers


def face_restorer_key(preset: FaceRestorerPreset, files: ReleaseFiles) -> ModelKey:
    return ModelKey(FACE_RESTORER, str(files.path(preset.file)), "",
                    json.dumps({"folder": str(files.cache_dir), "helpers": [f.name for f in preset.helpers]}))


class FaceNetworks(torch.nn.Module):
    """GFPGAN and facexlib's helper networks, moved together by the manager. The helper (landmarks, alignment,
    paste-back) keeps per-image state: it is used only while the model is leased, under the device lock."""

    def __init__(self, restorer: torch.nn.Module, helper):
        super().__init__()
        self.restorer = restorer
        self.detector = helper.face_det
        self.parser = helper.face_parse
        self.helper = helper

    def place_helper(self, device: torch.device) -> None:
        """facexlib keeps its device as a plain attribute (and the detector its mean pixel as a plain tensor):
        follow wherever the manager put the networks."""
        self.helper.device = self.detector.device = device
        self.detector.mean_tensor = self.detector.mean_tensor.to(device)


class FaceRestorerLoader:
    """Builds GFPGAN v1.4 (the clean architecture, channel multiplier 2) and facexlib's FaceRestoreHelper from the
    files in the cache folder. They stay in float32: facexlib's detector casts its input only when built for half."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return sum(path.stat().st_size for path in self._paths(key))  # fp32 .pth files: about the parameters

    def load(self, key: ModelKey, dtype: torch.dtype) -> FaceNetworks:
        self._paths(key)  # every file there, or facexlib would download the missing one
        try:
            install_functional_tensor_shim()
            from facexlib.utils.face_restoration_helper import FaceRestoreHelper
            from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

            restorer = GFPGANv1Clean(out_size=FACE_SIZE, num_style_feat=512, channel_multiplier=2,
                                     decoder_load_path=None, fix_decoder=False, num_mlp=8, input_is_latent=True,
                                     different_w=True, narrow=1, sft_half=True)
            restorer.load_state_dict(read_pth(key.source), strict=True)
            # facexlib reads its two files with torch.load, which is weights_only by default on this torch
            helper = FaceRestoreHelper(1, face_size=FACE_SIZE, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                                       save_ext="png", use_parse=True, device=torch.device("cpu"),
                                       model_rootpath=json.loads(key.config)["folder"])
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - one clear message for any broken file
            raise ModelUnavailable(f"Face restorer {Path(key.source).name} could not be loaded: "
                                   f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
        return FaceNetworks(restorer.eval(), helper).requires_grad_(False)

    @staticmethod
    def _paths(key: ModelKey) -> list[Path]:
        config = json.loads(key.config)
        paths = [Path(key.source), *(Path(config["folder"]) / name for name in config["helpers"])]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise ModelUnavailable(f"Face restoration needs {', '.join(missing)} in {config['folder']}.")
        return paths


class FaceRestoration:
    """The face restorers whose files are present, and restoring the faces of an image with one of them."""

    def __init__(self, manager: ModelManager, presets: dict[str, FaceRestorerPreset], files: ReleaseFiles):
        self.manager = manager
        self.files = files
        # looked at once, at start: a restorer whose files are missing or wrong is not offered
        self.presets = {name: preset for name, preset in presets.items() if self._present(preset)}

    @property
    def names(self) -> list[str]:
        return list(self.presets)

    def check(self, name: str) -> list[str]:
        if name == NO_FACE_RESTORATION or name in self.presets:
            return []
        if not self.presets:
            return [f"Face restoration is not available here (no face restorer's weights are in {self.files.cache_dir}); "
                    f"use {NO_FACE_RESTORATION!r}."]
        return [f"Unknown face restorer {name!r}. Available: {', '.join([NO_FACE_RESTORATION, *self.presets])}."]

    def key(self, name: str) -> ModelKey:
        return face_restorer_key(self.presets[name], self.files)

    def restore(self, rgb: np.ndarray, name: str, visibility: float) -> tuple[np.ndarray, int]:
        """`rgb` (H×W×3 uint8) with its faces restored and blended in at `visibility` (A1111's: 1 = the restored
        faces alone); and how many faces were found. One turn on the device."""
        if name not in self.presets:
            raise InvalidRequest(self.check(name))
        # the detector's features on the image at 640 px, and GFPGAN's on one 512 px face (the paste-back is on the
        # CPU)
        working = DETECTION_SIDE * DETECTION_SIDE * 2 * 256 + FACE_SIZE * FACE_SIZE * 4096
        with self.manager.turn(), self.manager.use({"faces": self.key(name)}, working) as models:
            networks: FaceNetworks = models["faces"]
            networks.place_helper(self.manager.device)
            restored, count = restore_faces(networks, rgb, self.manager.device)
        if visibility < 1:
            blended = rgb.astype(np.float32) * (1 - visibility) + restored.astype(np.float32) * visibility
            restored = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        return restored, count

    def _present(self, preset: FaceRestorerPreset) -> bool:
        for release in preset.files:
            if not self.files.path(release).is_file():
                return False
            try:
                self.files.ensure(release)  # there already: only its sha256 is checked
            except ModelUnavailable as error:
                log.warning("face restorer %s not offered: %s", preset.name, str(error).splitlines()[0])
                return False
        return True


@torch.no_grad()
def restore_faces(networks: FaceNetworks, rgb: np.ndarray, device: torch.device) -> tuple[np.ndarray, int]:
    """GFPGANer.enhance's steps (detect, align, restore each face, paste back through the parsed face mask) on
    leased networks, without its own loading. facexlib works in BGR."""
    from basicsr.utils import img2tensor, tensor2img
    from torchvision.transforms.functional import normalize

    helper = networks.helper
    helper.clean_all()
    try:
        helper.read_image(np.ascontiguousarray(rgb[:, :, ::-1]))
        # on the image at 640 px: RetinaFace's largest anchors are 512 px, and a face after a ×4 upscale is larger
        helper.get_face_landmarks_5(only_center_face=False, resize=DETECTION_SIDE, eye_dist_threshold=5)
        helper.align_warp_face()
        for face in helper.cropped_faces:
            tensor = img2tensor(face / 255.0, bgr2rgb=True, float32=True)
            normalize(tensor, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
            output = networks.restorer(tensor.unsqueeze(0).to(device), return_rgb=False, weight=0.5)[0]
            helper.add_restored_face(tensor2img(output.squeeze(0).float(), rgb2bgr=True, min_max=(-1, 1)).astype("uint8"))
        count = len(helper.cropped_faces)
        if not count:
            return rgb, 0
        helper.get_inverse_affine(None)
        pasted = helper.paste_faces_to_input_image()
        return np.ascontiguousarray(np.clip(pasted, 0, 255).astype(np.uint8)[:, :, ::-1]), count
    finally:  # the helper is kept with the model: it must not keep this image (clean_all leaves the input)
        helper.clean_all()
        helper.input_img = None

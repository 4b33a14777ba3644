"""Upscaler presets (presets/upscalers.yaml), their release files, and the loader the ModelManager uses for them.

Real-ESRGAN's weights are GitHub release files, not Hub repos: `ReleaseFiles` fetches one on first use into the
cache folder (before any device work), checks it against the pinned sha256, and says offline which file to put
where. `.pth` files are loaded with `torch.load(weights_only=True)`, so a file carrying pickled code is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from studio.core.downloads import ProgressCallback, hub_offline_by_env, human_size, one_line
from studio.core.errors import ModelUnavailable, UnknownPreset
from studio.core.model_records import ModelKey
from studio.models.basicsr_compat import rrdbnet_class, srvgg_class
from studio.models.presets import PRESETS_DIR
from studio.models.weights import safetensors_bytes, weight_files

UPSCALER = "upscaler"  # the ModelManager kind
ARCHITECTURES = {"RRDBNet": rrdbnet_class, "SRVGGNetCompact": srvgg_class}
DOWNLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ReleaseFile:
    name: str  # the official release file name, e.g. "RealESRGAN_x4plus.pth"
    url: str
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class UpscalerPreset:
    name: str
    label: str
    resize: str | None = None  # "lanczos": a plain resize, no model
    folder: str | None = None  # a local folder: config.json + one .safetensors file
    file: ReleaseFile | None = None  # a release file, fetched on first use
    denoise_file: ReleaseFile | None = None  # realesr-general-x4v3's "without denoise" partner for DNI
    arch: str = "RRDBNet"
    arch_args: tuple[tuple[str, Any], ...] = ()  # frozen: the architecture's constructor arguments
    a1111_name: str | None = None  # what A1111 calls the same upscaler ("R-ESRGAN 4x+"), in PNGs both ways

    @property
    def written_name(self) -> str:
        """The name a PNG gets, A1111's where it has one: A1111 then finds the same upscaler."""
        return self.a1111_name or self.name

    @property
    def is_model(self) -> bool:
        return self.resize is None

    @cached_property  # a folder's config.json is read once, not at every look (callers do not change the dict)
    def architecture(self) -> dict[str, Any]:
        """{"arch": name, **constructor arguments}, from the preset or the folder's config.json."""
        if self.folder:
            config = json.loads((Path(self.folder) / "config.json").read_text())
            return {"arch": config.pop("arch", "RRDBNet"), **config}
        return {"arch": self.arch, **dict(self.arch_args)}

    @property
    def native_scale(self) -> int:
        if not self.is_model:
            return 1
        arguments = self.architecture
        return int(arguments.get("scale", arguments.get("upscale", 4)))

    @property
    def has_denoise(self) -> bool:
        return self.denoise_file is not None


@dataclass
class UpscalerCatalog:
    presets: dict[str, UpscalerPreset]
    default: str
    _names: list[str] = field(init=False)

    def __post_init__(self):
        self._names = list(self.presets)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> UpscalerPreset:
        try:
            return self.presets[name]
        except KeyError:
            raise UnknownPreset(f"Unknown upscaler {name!r}. Available upscalers: {', '.join(self._names)}.") from None

    def only(self, names: list[str]) -> UpscalerCatalog:
        """The same catalog narrowed to `names` (ZeroGPU: the upscalers that could be placed at start)."""
        kept = {name: preset for name, preset in self.presets.items() if name in names}
        return UpscalerCatalog(kept, self.default if self.default in kept else next(iter(kept)))

    def with_preset(self, preset: UpscalerPreset) -> UpscalerCatalog:
        return UpscalerCatalog({**self.presets, preset.name: preset}, self.default)

    def find(self, written: str) -> UpscalerPreset | None:
        """The preset a PNG names, by our name or A1111's, in any case; None when there is none."""
        wanted = written.strip().lower()
        for preset in self.presets.values():
            if wanted in (preset.name.lower(), (preset.a1111_name or "").lower()):
                return preset
        return None

    def choices(self) -> list[tuple[str, str]]:
        return [(preset.label, name) for name, preset in self.presets.items()]


def release_file_from(entry: dict, prefix: str = "") -> ReleaseFile | None:
    """A release file from a presets entry's `file`, `url`, `sha256` and `bytes` (under `prefix`)."""
    if f"{prefix}file" not in entry:
        return None
    return ReleaseFile(entry[f"{prefix}file"], entry[f"{prefix}url"], entry[f"{prefix}sha256"].lower(),
                       int(entry[f"{prefix}bytes"]))


def load_upscalers(path: Path = PRESETS_DIR / "upscalers.yaml") -> UpscalerCatalog:
    data = yaml.safe_load(Path(path).read_text())
    presets = {}
    for name, entry in data["upscalers"].items():  # (its face_restorers section: faces.py)
        folder = entry.get("folder")
        if folder and not Path(folder).is_absolute():
            folder = str((Path(path).parent / folder).resolve())
        presets[name] = UpscalerPreset(
            name=name, label=entry.get("label", name), resize=entry.get("resize"), folder=folder,
            file=release_file_from(entry), denoise_file=release_file_from(entry, "denoise_"), arch=entry.get("arch", "RRDBNet"),
            arch_args=tuple(sorted(entry.get("arch_args", {}).items())), a1111_name=entry.get("a1111_name"),
        )
        if sum(bool(x) for x in (presets[name].resize, folder, presets[name].file)) != 1:
            raise ValueError(f"{path}: upscaler {name!r} needs exactly one of resize, folder or file.")
    return UpscalerCatalog(presets, data.get("default", next(iter(presets))))


# ----- release files -----


class ReleaseFiles:
    """Release files in one cache folder. One lock per file: two visitors asking for the same missing file
    download it once. A file already there is hashed once per process (keyed by its size and mtime)."""

    def __init__(self, cache_dir: str | Path, offline: bool | None = None):
        self.cache_dir = Path(cache_dir)
        self.offline = hub_offline_by_env() if offline is None else offline
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._verified: dict[str, tuple[int, int]] = {}

    def path(self, release: ReleaseFile) -> Path:
        return self.cache_dir / release.name

    def is_ready(self, release: ReleaseFile) -> bool:
        target = self.path(release)
        return target.is_file() and self._verified.get(release.name) == self._stamp(target)

    def ensure(self, release: ReleaseFile, on_progress: ProgressCallback | None = None) -> Path:
        with self._lock(release.name):
            target = self.path(release)
            if target.is_file():
                if self._verified.get(release.name) != self._stamp(target):
                    self._check(target, release, on_progress)
                return target
            if self.offline:
                raise self._missing(release, "the studio is offline")
            self._download(release, on_progress)
            return target

    def _download(self, release: ReleaseFile, on_progress: ProgressCallback | None) -> None:
        """Into a temporary file of its own in the cache folder (two processes sharing the cache do not clash),
        renamed into place only once its size and sha256 are right; removed on any failure."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=f".{release.name}.", suffix=".part",
                                             delete=False)
        partial = Path(handle.name)
        digest, done = hashlib.sha256(), 0
        try:
            try:
                with handle, urllib.request.urlopen(release.url, timeout=60) as response:
                    while chunk := response.read(DOWNLOAD_CHUNK):
                        done += len(chunk)
                        if done > release.size:
                            raise ModelUnavailable(f"{release.url} sent more than the {human_size(release.size)} of "
                                                   f"{release.name}: it was not kept.")
                        handle.write(chunk)
                        digest.update(chunk)
                        if on_progress:
                            on_progress(done, release.size, f"Downloading {release.name}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                raise self._missing(release, f"the download failed: {one_line(error)}") from error
            if digest.hexdigest() != release.sha256:
                raise ModelUnavailable(f"{release.name} from {release.url} has sha256 {digest.hexdigest()[:12]}…, not "
                                       f"the pinned {release.sha256[:12]}…: it was not kept. Try again, or fetch it "
                                       "by hand.")
            os.replace(partial, self.path(release))
            self._verified[release.name] = self._stamp(self.path(release))
        finally:
            partial.unlink(missing_ok=True)

    def _check(self, target: Path, release: ReleaseFile, on_progress: ProgressCallback | None) -> None:
        digest, done, size = hashlib.sha256(), 0, target.stat().st_size
        with open(target, "rb") as handle:
            while chunk := handle.read(DOWNLOAD_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done, size, f"Checking {release.name}")
        if digest.hexdigest() != release.sha256:
            raise ModelUnavailable(f"{target} is not the official {release.name} (sha256 {digest.hexdigest()[:12]}…, "
                                   f"expected {release.sha256[:12]}…). Delete it; the studio fetches the right one "
                                   f"from {release.url}.")
        self._verified[release.name] = self._stamp(target)

    def _missing(self, release: ReleaseFile, why: str) -> ModelUnavailable:
        return ModelUnavailable(f"{release.name} ({human_size(release.size)}) is not in {self.cache_dir} and {why}. "
                                f"Download {release.url} and put it in that folder (sha256 {release.sha256}).")

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns


# ----- the manager's loader -----


def upscaler_key(preset: UpscalerPreset, files: ReleaseFiles | None = None, denoise_strength: float = 1.0) -> ModelKey:
    """The model key of a model upscaler: a folder, or a release file (with its DNI partner and the strength)."""
    if preset.folder:
        return ModelKey(UPSCALER, preset.folder)
    config: dict[str, Any] = {"architecture": preset.architecture}
    part = ""
    if preset.has_denoise and denoise_strength < 1:
        config["denoise_file"] = str(files.path(preset.denoise_file))
        part = f"denoise {denoise_strength:g}"
        config["denoise_strength"] = denoise_strength
    return ModelKey(UPSCALER, str(files.path(preset.file)), part, json.dumps(config, sort_keys=True))


def build_network(architecture: dict[str, Any]) -> torch.nn.Module:
    arguments = dict(architecture)
    name = arguments.pop("arch", "RRDBNet")
    if name not in ARCHITECTURES:
        raise ModelUnavailable(f"Architecture {name!r} is not one this studio runs ({', '.join(ARCHITECTURES)}).")
    return ARCHITECTURES[name]()(**arguments)


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A Real-ESRGAN .pth's weights (`params_ema`, else `params`, else the file itself), with weights_only=True:
    a file that needs code to unpickle is refused, not run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelUnavailable(f"{Path(path).name} was refused: it is not weights only, it carries pickled code "
                               f"({one_line(error, 120)}). Use the official release file.") from None
    for name in ("params_ema", "params"):
        if isinstance(state, dict) and name in state:
            return state[name]
    return state


class UpscalerLoader:
    """Loads upscaler networks for the ModelManager: a folder (config.json + .safetensors) or a release .pth,
    blended with its denoise partner (Real-ESRGAN's DNI: strength × a + (1 - strength) × b) when the key asks."""

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        files = self._weight_files(key)
        missing = [path for path in files if not path.is_file()]
        if missing:
            raise ModelUnavailable(f"Upscaler weights {missing[0]} are missing.")
        if files[0].suffix == ".safetensors":
            return safetensors_bytes(files, dtype)
        stored = files[0].stat().st_size  # a .pth of fp32 weights is about the parameters' size
        return stored * torch.finfo(dtype).bits // 32

    def load(self, key: ModelKey, dtype: torch.dtype) -> torch.nn.Module:
        files = self._weight_files(key)
        config = json.loads(key.config) if key.config else None
        try:
            if config is None:  # a folder
                folder = Path(key.source)
                network = build_network(json.loads((folder / "config.json").read_text()))
                state = load_file(files[0])
            else:
                network = build_network(config["architecture"])
                state = read_pth(files[0])
                if "denoise_file" in config:
                    strength, partner = config["denoise_strength"], read_pth(config["denoise_file"])
                    state = {name: strength * value + (1 - strength) * partner[name] for name, value in state.items()}
            network.load_state_dict(state, strict=True)
        except ModelUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - one clear message for any broken file
            raise ModelUnavailable(f"Upscaler {Path(key.source).name} could not be loaded: {one_line(error)}") from error
        return network.to(dtype).eval().requires_grad_(False)

    @staticmethod
    def _weight_files(key: ModelKey) -> list[Path]:
        source = Path(key.source)
        if source.is_dir():
            files = weight_files(source, None)
            if len(files) != 1:
                raise ModelUnavailable(f"Upscaler folder {source} must hold exactly one .safetensors file "
                                       f"(found {len(files)}).")
            return files
        return [source]

"""Which components a (preset, task) is made of, as ModelKeys the manager shares; pipelines assembled over them;
the files to fetch for them; and A1111's model hash of the weights a task runs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from studio.core.downloads import DownloadRequest, diffusers_patterns, human_size, one_line
from studio.core.errors import ModelUnavailable
from studio.core.model_records import ModelKey
from studio.models.families import TASKS, checkpoint_family, family_of
from studio.models.loading import (
    CHECKPOINT_KIND,
    KIND,
    SAFETY_ROLES,
    WEIGHTLESS,
    component_key,
    config_location,
    is_checkpoint_file,
    split_part,
    standalone_key,
)
from studio.models.weights import root_weight_patterns, safetensors_header

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"


class DiffusersModels:
    """Which components a (preset, task) is made of, and pipelines assembled over them."""

    def __init__(self, device: torch.device, safety_checker_everywhere: bool = False,
                 safety_checker_source: str = SAFETY_CHECKER_REPO):
        self.device = torch.device(device)
        # Public mode: every preset gets a safety checker (its own, or CompVis's), unless it is safe by construction.
        self.safety_checker_everywhere = safety_checker_everywhere
        self.safety_checker_source = safety_checker_source
        self._hashes: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256
        self._scale_factors: dict[ModelKey, int] = {}
        self._lock = threading.Lock()

    def keys(self, preset, task: str) -> dict[str, ModelKey]:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        family = family_of(preset)
        keys = {role: component_key(preset.source, role, preset.config_source) for role in family.components}
        if task == "inpaint" and preset.inpaint_source:
            # A dedicated 9-channel inpainting UNet; text encoders, VAE and tokenizers stay the base's.
            keys[family.denoiser] = component_key(preset.inpaint_source, family.denoiser, preset.config_source)
        for role, source in preset.components.items():  # e.g. a VAE from another repo
            keys[role] = standalone_key(role, source)
        if self.needs_safety_checker(preset):
            if preset.safety_checker:
                keys.update({role: ModelKey(KIND, preset.config_source, role) for role in SAFETY_ROLES})
            else:
                keys.update({role: standalone_key(role, self.safety_checker_source) for role in SAFETY_ROLES})
        return keys

    def needs_safety_checker(self, preset) -> bool:
        return preset.safety_checker or (self.safety_checker_everywhere and not preset.safe_by_construction)

    def stage_keys(self, preset, task: str, stage: str) -> dict[str, ModelKey]:
        keys = self.keys(preset, task)
        roles = SAFETY_ROLES if stage == "check" else family_of(preset).stage_components(stage, task)
        return {role: key for role, key in keys.items() if role in roles}

    def vae_scale_factor(self, preset, task: str) -> int:
        """How much the VAE downsamples, read from its config: a pipeline without its VAE (text-to-image
        denoising) would otherwise assume 8, and the embedded model's VAE downsamples by 4."""
        key = self.keys(preset, task)[family_of(preset).vae]
        with self._lock:
            if key in self._scale_factors:
                return self._scale_factors[key]
        source, subfolder = config_location(key)
        config = AutoencoderKL.load_config(source, subfolder=subfolder, local_files_only=not os.path.isdir(source))
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        with self._lock:
            self._scale_factors[key] = factor
        return factor

    def download_requests(self, preset, task: str, dtype: torch.dtype) -> list[DownloadRequest]:
        """What to fetch from the Hub for (preset, task), one request per source (folders need nothing)."""
        subfolders: dict[str, list[str]] = {}
        standalone: dict[str, list[str]] = {}
        configs_only: dict[str, list[str]] = {}
        checkpoint_files: dict[str, list[str]] = {}  # configs source -> the files whose weights it describes
        for key in self.keys(preset, task).values():
            if key.kind == CHECKPOINT_KIND:  # the weights are in the file: only the component's config is fetched
                config_source, subfolder = config_location(key)
                configs_only.setdefault(config_source, []).append(subfolder)
                checkpoint_files.setdefault(config_source, []).append(Path(key.source).name)
                continue
            role, subfolder = split_part(key.part)
            (subfolders if subfolder else standalone).setdefault(key.source, []).append(subfolder or role)
        variant = self.variant_for([preset])
        requests = []
        for source in dict.fromkeys([*subfolders, *standalone, *configs_only]):
            if os.path.isdir(source):
                continue
            patterns = (list(diffusers_patterns(subfolders[source], variant(source, dtype), WEIGHTLESS))
                        if source in subfolders else [])
            for role in standalone.get(source, []):  # a model of its own: its files sit at the repo's root
                patterns += ["preprocessor_config.json"] if role in WEIGHTLESS else root_weight_patterns(
                    variant(source, dtype))
            label = f"Preset {preset.label!r}"
            if source in configs_only:  # a checkpoint's configs: the weights are in its file(s)
                patterns += ["model_index.json", *(f"{subfolder}/config.json" for subfolder in configs_only[source])]
                weighted = [name for name in subfolders.get(source, []) if name not in WEIGHTLESS]
                if not weighted and source not in standalone:
                    files = ", ".join(dict.fromkeys(checkpoint_files[source]))
                    label = (f"Preset {preset.label!r} (its configs: tokenizer, scheduler, config.json; the weights "
                             f"are in {files})")
            requests.append(DownloadRequest(source, tuple(dict.fromkeys(patterns)), label=label))
        return requests

    def variant_for(self, presets) -> Callable[[str, torch.dtype], str | None]:
        """(source, dtype) -> the file variant to load: a preset's `variant` applies on GPUs (fp16); some
        inpainting repos ship fp16 files only, so their variant applies everywhere."""
        def variant(source: str, dtype: torch.dtype) -> str | None:
            for preset in presets:
                if source == preset.inpaint_source and preset.inpaint_variant:
                    return preset.inpaint_variant
                if source == preset.source and dtype == torch.float16:
                    return preset.variant
            return None

        return variant

    def dtype_for(self, presets) -> Callable[[ModelKey, torch.dtype], torch.dtype]:
        """(key, the manager's dtype) -> the dtype the model loads in: its preset's family's (SD 3 and FLUX run in
        bfloat16 where the studio runs in float16)."""
        families: dict[str, Any] = {}
        for preset in presets:
            for task in TASKS:
                for role, key in self.keys(preset, task).items():
                    if role in family_of(preset).components:  # not the safety checker SD presets share
                        families.setdefault(key.source, family_of(preset))

        def dtype_for(key: ModelKey, dtype: torch.dtype) -> torch.dtype:
            family = families.get(key.source)
            return family.compute_dtype(dtype) if family is not None else dtype

        return dtype_for

    def assemble(self, preset, task: str, parts: dict[str, Any], controlnet: Any = None):
        """A pipeline over the given components; those a stage does not use are None, so that the pipeline
        object never keeps a model alive that the manager has let go. `controlnet` (a job's control units): the
        family's ControlNet pipeline for the task, running them."""
        family = family_of(preset)
        arguments = family.pipeline_arguments(parts)
        if controlnet is not None:
            arguments["controlnet"] = controlnet
        if arguments[family.scheduler] is not None:
            # A private scheduler copy: schedulers keep per-call state (step index), pipelines share the rest.
            scheduler = arguments[family.scheduler]
            arguments[family.scheduler] = type(scheduler).from_config(scheduler.config)
        pipeline = family.pipeline_class_for(task, parts, controlnet=controlnet is not None)(**arguments)
        if arguments[family.vae] is None and arguments[family.denoiser] is not None:
            pipeline.vae_scale_factor = self.vae_scale_factor(preset, task)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    # ----- model hash for PNG metadata (A1111's "Model hash": sha256 of the weights, first 10 hex) -----

    def model_hash(self, preset, task: str = "text2img",
                   on_progress: Callable[[int, int, str], None] | None = None) -> str | None:
        """The hash of the weights this task really runs (a dedicated inpainting checkpoint's own, as A1111 does):
        for a single-file checkpoint the file's, A1111's own short hash; for a diffusers repo or folder its UNet
        file's. Where the file must be read for it (once per file), `on_progress(bytes read, size, text)` follows."""
        source = preset.inpaint_source if task == "inpaint" and preset.inpaint_source else preset.source
        path = source if is_checkpoint_file(source) else self._denoiser_weights_path(preset, source)
        if path is None or not os.path.isfile(path):
            return None
        return self.file_hash(path, on_progress)[:10]

    def file_hash(self, path: str | Path, on_progress: Callable[[int, int, str], None] | None = None) -> str:
        """The sha256 of a weights file (hex), read once per file and kept; in the Hub cache, an LFS blob's name
        is its sha256, so gigabytes need not be read."""
        status = os.stat(path)
        identity = (os.path.realpath(path), status.st_size, status.st_mtime_ns)  # a file replaced in place is new
        with self._lock:
            if identity in self._hashes:
                return self._hashes[identity]
        name = os.path.basename(identity[0])
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            digest = name
        else:
            digest = _sha256(str(path), on_progress)
        with self._lock:
            self._hashes[identity] = digest
        return digest

    def check_checkpoint_files(self, preset, task: str) -> None:
        """A preset's single-file checkpoints, checked before anything is fetched or loaded: there, readable, and
        of the preset's family. Raises ModelUnavailable naming the preset, the field and the file."""
        fields = [("checkpoint", preset.checkpoint)]
        if task == "inpaint":
            fields.append(("inpaint_checkpoint", preset.inpaint_checkpoint))
        for field_name, path in fields:
            if path is None:
                continue
            if not path.is_file():
                raise ModelUnavailable(f"Preset {preset.label!r}: its {field_name} file {path} does not exist. Check "
                                       "the path in the presets file (a relative path is relative to that file).")
            try:
                found = checkpoint_family(safetensors_header(path))
            except OSError as error:  # e.g. no permission to read it
                raise ModelUnavailable(f"Preset {preset.label!r}: its {field_name} file {path} cannot be read "
                                       f"({one_line(error)}).") from None
            except ModelUnavailable as error:
                raise ModelUnavailable(f"Preset {preset.label!r}: {error}") from None
            if found is not None and found is not family_of(preset):
                raise ModelUnavailable(f"Preset {preset.label!r}: {path.name} looks like a {found.label} "
                                       f"checkpoint, but the preset says family {preset.family} "
                                       f"({family_of(preset).label}). Set `family: {found.name}`.")

    def text_encoder_layers(self, preset) -> int | None:
        """How many layers the preset's (first) text encoder has, from its config file where it can be read
        without a download (a local folder, or the Hub cache); None otherwise."""
        found = file_without_download(*config_location(self.keys(preset, "text2img")[family_of(preset).text_encoders[0]]), "config.json")
        return json.loads(Path(found).read_text()).get("num_hidden_layers") if found else None

    def cross_attention_dim(self, preset, task: str = "text2img") -> int | None:
        """The width of the text embeddings the preset's UNet reads (which LoRAs fit it), from its config file
        where it can be read without a download; None otherwise."""
        found = file_without_download(*config_location(self.keys(preset, task)[family_of(preset).denoiser]), "config.json")
        return json.loads(Path(found).read_text()).get("cross_attention_dim") if found else None

    def _denoiser_weights_path(self, preset, source: str) -> str | None:
        variant = preset.inpaint_variant if source == preset.inpaint_source else preset.variant
        # a local folder has the plain file; on the Hub the variant is what is fetched (always for inpainting repos
        # that ship only fp16)
        use_variant = variant and not os.path.isdir(source) and (self.device.type != "cpu"
                                                                  or source == preset.inpaint_source)
        filename = f"diffusion_pytorch_model.{variant}.safetensors" if use_variant else "diffusion_pytorch_model.safetensors"
        return file_without_download(source, family_of(preset).denoiser, filename)


def file_without_download(source: str, subfolder: str | None, filename: str) -> str | None:
    """The local path of a model file, in a folder or in the Hub cache; None when it would need a download."""
    if os.path.isdir(source):
        path = Path(source) / (subfolder or "") / filename
        return str(path) if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    # huggingface_hub 1.x takes the file's path in the repo (it has no `subfolder` here)
    found = try_to_load_from_cache(source, f"{subfolder}/{filename}" if subfolder else filename)
    return found if isinstance(found, str) else None


def _sha256(path: str, on_progress: Callable[[int, int, str], None] | None = None) -> str:
    digest, size, done = hashlib.sha256(), os.path.getsize(path), 0
    name = os.path.basename(path)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, size, f"Reading {name} for its hash (once per file): {human_size(done)} of "
                                        f"{human_size(size)}")
    return digest.hexdigest()



"""The GPU tier: SD 1.5 and SDXL at their real sizes in fp16, SD 3.5 Large and FLUX.1-dev at theirs in bf16, random
weights, through the studio's engine on one CUDA GPU, with what the CPU tests cannot see measured per stage. One
script, no network, no gradio; about 5 to 8 minutes on an 80 GB H100, of which about 2.5 for SD 3.5 and FLUX (an
estimate: not yet run there; it skips the cases not started by 7 minutes). `--only-flow` runs only SD 3.5's and
FLUX's cases (about 3 minutes).

On a GPU machine (Python 3.12, torch, transformers, accelerate, peft, safetensors and numpy installed; no package
index), from the repository root, with the wheels folder carried along:

    python3 bench/gpu_check.py --wheels bench/wheels

With the device tool (whose reply keeps only the output's last 12,000 characters: the whole log comes back as a file):
run(command="set -o pipefail; python3 bench/gpu_check.py --wheels bench/wheels 2>&1 | tee $OUT/gpu_check.log",
carry=["bench/wheels"], timeout_s=560).

Fill the folder beforehand, here (pure-Python wheels, and Pillow's for that Python: about 13 MiB; it prints the total
with the tracked files', which must stay within the 64 MiB a device run carries):

    bash bench/gpu_wheels.sh bench/wheels 3.12

What it does:
1. Builds SD 1.5 (UNet, VAE, CLIP ViT-L text encoder) and SDXL (UNet, CLIP ViT-L and OpenCLIP bigG text encoders,
   the fp16-fix VAE as a `components: vae:` folder, as presets/models.yaml has it) from the real config.json dicts of
   bench/device_plan.py, with random weights, directly on the GPU in fp16; saves them as diffusers folders (byte-level
   CLIP tokenizers made offline, the repos' schedulers) in a temporary folder, with a presets YAML (`local:`), and an
   upscaler folder with an RRDBNet of Real-ESRGAN x4plus's size (num_feat 64, num_block 23, num_grow_ch 32).
2. Loads them through the studio's own factory and loaders (studio.tasks.engines.build_manager / build_engines, device
   cuda, fp16, the app's free-memory report) and runs, per family: text to image (512² / 1024²), inpaint (a square
   mask) and Hires. fix (Latent, ×2 / ×1.5); then a ×4 upscale of a 512² image. With control units: SD 1.5 with a
   ControlNet of lllyasviel's size, SDXL with a Union of ProMax's size and a T2I-Adapter of TencentARC's sketch
   adapter's size at once (random weights from bench/device_plan.py's configs): whether the 10% of working memory
   the denoise stage adds per unit covers what the units use (`reserved` vs `used`). SD 1.5 with TAESD live
   previews (a random AutoencoderTiny of madebyollin/taesd's config, the preset's `preview_decoder:`), watched as the
   page watches a job: the image's time with previews at the default interval ÷ without (target <= 1.03), and the
   denoise stage's `reserved` vs `used` with the decoder leased beside the UNet.
3. Model CPU offload and memory limits, each on a fresh manager:
   A. SD 1.5 text to image, text encoders pinned (`manager.preload(..., pin=True)`, as ZeroGPU does), a budget too
      small for the UNet and its working memory: the fallbacks, then (expected) a clear OutOfMemoryBudget.
   B. SD 1.5 inpaint, text encoders pinned, a budget that holds the UNet but not the UNet and the VAE: the denoise
      stage falls back to accelerate's model CPU offload.
   C. SD 1.5 text to image at 1024², every model pinned, the allocator capped 64 MiB above the weights
      (torch.cuda.set_per_process_memory_fraction): real CUDA out-of-memory errors walk the fallbacks to model CPU
      offload with pinned models in the stage; then a 512² image without the cap.
   D. SDXL 1024² under an 8 GiB budget, the allocator capped at 8 GiB too.
4. SD 3.5 Large and FLUX.1-dev at full size (bench/device_plan.py's configs: FLUX's transformer 11.9 B parameters,
   SD 3.5 Large's 8.1 B, T5-XXL 4.76 B, CLIPs, VAE), 1024², 8 steps, their presets' CFG (FLUX: 1, distilled 3.5;
   SD 3.5: 3.5), as presets of family flux / sd3 over folders without weight files: the manager's diffusers loader
   is wrapped (RandomWeights) to make each component anew at every load, seeded, on the GPU in bf16 (seconds), then
   moved to RAM as a loaded model is (no 33 GB of files to write and read three times). They run after the cases
   of 2, before those of 3; per model:
   - as planned on the big GPU, twice: the second image's denoise time is the plain one (and whether it is the same
     image);
   - a fresh manager under the budget that leaves the denoise stage float8 storage (FLUX 16 GiB, SD 3.5 Large
     12 GiB): the stage must run "float8 storage", and the image against the plain one: mean and max difference in
     levels of 255 (tolerance: mean <= 1.5, tests/test_flow_memory.py's);
   - a fresh manager under 8 GiB: the denoise stage must stream the transformer's blocks from RAM: its `used` vs
     `reserved` (the streamed blocks' room included), its time ÷ the plain one, (the streams' setup apart).
   The denoise stage's placement is checked in each ("flow placements as expected n/6" in the last line).

Printed, per stage (encode, denoise, decode; upscale tiles):
- `reserved`: the working memory the manager reserved for the stage (its StagePlan's, with CUDA's floor; under
  model CPU offload plus the largest model) vs `used`: torch.cuda.max_memory_allocated during the stage minus
  torch.cuda.memory_allocated at its start (the peak stats are reset as the stage starts). `used` > `reserved` is
  flagged OVER: the manager under-reserved.
- `manager`: the bytes the manager records on the device as the stage starts vs `allocated`: torch's
  memory_allocated then (the difference is what is not a model: latents, embeddings, the allocator's rounding).
- `how`: as planned, or the fallbacks it tried, the last being how it ran (VAE tiling, idle models off, float8
  storage, model CPU offload, block streaming), and `[float8: ...]` its models stored in float8 (the manager's
  books); a failed stage says why. `NaN`: whether the stage's output (embeddings, latents, image) holds NaN or inf
  (the engine then raises NumericalError, which ends the case and is printed).
- For text to image, the denoise speed in it/s: the studio's denoise stage vs a bare diffusers pipeline built on the
  very same module objects, same scheduler, embeddings, size and steps (best of 3 after a warm-up each); the ratio
  studio / bare has a target of >= 0.97.
- After each case: the manager's recorded device bytes vs torch.cuda.memory_allocated, and for every model the
  manager records, whether its recorded placement (device / ram) is where its parameters really are
  (`next(module.parameters()).device`, all parameters and buffers checked), and whether an accelerate hook is still
  attached. A pinned model inside a stage that falls back to model CPU offload (case C) is moved to the CPU by
  accelerate's hook (`CpuOffload.init_hook`) while the manager keeps it recorded (and pinned) on the device: this
  check says whether that happens.
- What ended a task, when it did not finish: `ENDED by OutOfMemoryBudget` or `NumericalError` (the studio's own
  messages, as a user would see them), or `UNEXPECTED <error> at <file>:<line>` (any other error: an engine bug).
- The last line sums up: cases, stages, NaN stages, stages OVER their reservation, placement mismatches, unexpected
  errors, the speed ratios, the float8 images' mean (max) difference, block streaming's time ratios, the flow
  placements as expected, seconds. Findings are printed, not failed: the exit code is 1 only when the script itself
  broke in a case (its traceback is printed), 2 when it cannot start (no CUDA, a missing import).

`--smoke` runs the same code on the CPU with tiny models (float32, 64 px, 2 steps) in well under a minute, for
tests/test_bench_smoke.py; what needs CUDA (memory figures, offload, the allocator cap) says so where it is skipped.
There SD 3's and FLUX's budgets are leases limited in weights (limit_weights: on the CPU the working-memory
estimates dwarf tiny models), sized from the tiny models so that the same fallbacks are reached.

Imports: the engine's import closure on a machine with only the packages above (checked with
`--only-gpu-machine-packages`, which reruns this script with `python -S` on a view of this venv holding only those
packages and what they require, the rest from the wheels folder) needs, besides them: diffusers, compel, pyparsing,
Pillow (binary: a wheel for that Python, unpacked at start), requests, urllib3, certifi, charset-normalizer
(diffusers checks requests' version at import); these are what bench/gpu_wheels.sh fetches. Not needed: gradio;
scipy (only Inpaint sketch's mask uses it, imported there); basicsr (its RRDBNet needs cv2, scipy and torchvision to
import: when it is missing the upscaler's architecture is the copy below, the same module and key names, checked
against basicsr's where both exist); torchsde (DPM++ SDE only, not run here).

    python bench/gpu_check.py --smoke
    python bench/gpu_check.py --smoke --only-flow  # SD 3's and FLUX's cases alone
    bash bench/gpu_wheels.sh /tmp/wheels-3.11 3.11  # the closure check here, with this venv's Python (3.11):
    python bench/gpu_check.py --smoke --only-gpu-machine-packages --wheels /tmp/wheels-3.11
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import string
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

STARTED = time.perf_counter()  # the time limit counts from here: imports and model folders included
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_WHEELS = ROOT / "bench" / "wheels"
GPU_MACHINE_PACKAGES = ("torch", "transformers", "accelerate", "peft", "safetensors", "numpy")
ENGINE_IMPORTS = ("torch", "transformers", "accelerate", "diffusers", "compel", "PIL", "yaml", "safetensors",
                  "requests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network there: no Hub call may wait for a timeout
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ===== 1. Before the engine is imported: the wheels folder, and the closure check =====

def early_options(argv: list[str]) -> argparse.Namespace:
    """The options that act before anything but the standard library is imported."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--wheels", default=str(DEFAULT_WHEELS))
    parser.add_argument("--only-gpu-machine-packages", action="store_true")
    return parser.parse_known_args(argv)[0]


def missing_modules(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def wheel_fits_this_python(wheel: Path) -> tuple[bool, bool]:
    """(fits, pure): whether one of the wheel's tags is this interpreter's, and whether it is pure Python."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    tags = parse_wheel_filename(wheel.name)[3]
    return bool(tags & set(sys_tags())), all(tag.platform == "any" for tag in tags)


def unpacked(wheel: Path) -> Path:
    """A binary wheel unpacked once into the temporary folder (extension modules do not import from a zip)."""
    target = Path(tempfile.gettempdir()) / "gpu_check_wheels" / wheel.stem
    if not target.is_dir():
        partial = target.with_name(f"{target.name}.partial")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
        partial.rename(target)
    return target


def use_wheels(folder: Path) -> list[str]:
    """When the engine's imports are not all installed, every wheel in `folder` whose distribution is not installed
    and which fits this Python goes on sys.path, after what is installed: a pure one as it is (zip import), a binary
    one unpacked. Returns the wheels added."""
    if not missing_modules(ENGINE_IMPORTS) or not folder.is_dir():
        return []
    added = []
    for wheel in sorted(folder.glob("*.whl")):
        fits, pure = wheel_fits_this_python(wheel)
        if not fits or installed(wheel.name.split("-")[0]):
            continue
        sys.path.append(str(wheel if pure else unpacked(wheel)))
        added.append(wheel.name)
    importlib.invalidate_caches()
    return added


def require_engine_imports(folder: Path) -> None:
    missing = missing_modules(ENGINE_IMPORTS)
    if missing:
        sys.exit(f"Cannot import {', '.join(missing)}, neither installed nor in the wheels folder {folder}. On a "
                 "machine with PyPI: bash bench/gpu_wheels.sh <folder> <this Python's version>, then bring the folder "
                 "(and pass --wheels <folder>).")


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions `roots` need, as installed here, following their requirements (no extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: set[str] = set()
    waiting = [canonicalize_name(root) for root in roots]
    while waiting:
        name = waiting.pop()
        if name in found or not installed(name):
            continue
        found.add(name)
        for line in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                waiting.append(canonicalize_name(requirement.name))
    return found


def gpu_machine_view(folder: Path) -> int:
    """`folder` gets links to the files (packages and their .dist-info) of GPU_MACHINE_PACKAGES and what they require,
    as installed here, and nothing else. Returns how many distributions."""
    from packaging.utils import canonicalize_name

    kept = requirement_closure(GPU_MACHINE_PACKAGES)
    for distribution in importlib.metadata.distributions():
        if canonicalize_name(distribution.metadata["Name"]) not in kept:
            continue
        for top in {file.parts[0] for file in distribution.files or []} - {"..", "bin", "__pycache__"}:
            source, link = Path(distribution.locate_file(top)), folder / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return len(kept)


def rerun_with_gpu_machine_packages(argv: list[str]) -> int:
    """This script again, with `python -S` (no site-packages) on a view of only the GPU machine's packages: what
    else it imports must come from the wheels folder, as it will there."""
    with tempfile.TemporaryDirectory() as view:
        count = gpu_machine_view(Path(view))
        print(f"closure check: only {', '.join(GPU_MACHINE_PACKAGES)} and what they require ({count} distributions "
              "as installed here) can be imported, the rest from the wheels folder", flush=True)
        arguments = [argument for argument in argv if argument != "--only-gpu-machine-packages"]
        return subprocess.run([sys.executable, "-S", __file__, *arguments],
                              env={**os.environ, "PYTHONPATH": view}).returncode


EARLY = early_options(sys.argv[1:]) if __name__ == "__main__" else None
if EARLY is not None and EARLY.only_gpu_machine_packages:
    sys.exit(rerun_with_gpu_machine_packages(sys.argv[1:]))
WHEELS_ADDED = use_wheels(Path(EARLY.wheels)) if EARLY is not None else []
if EARLY is not None:
    require_engine_imports(Path(EARLY.wheels))

# ===== 2. The engine =====

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from device_plan import (  # noqa: E402  (bench/device_plan.py: the repos' config.json files)
    CLIP_BIGG_TEXT_PROJ_PARAMS,
    CLIP_L_TEXT_PARAMS,
    FLOW_COMPONENTS,
    FLUX_DEV,
    SD35_LARGE,
    SD15_CONTROLNET,
    SD15_TEXT_ENCODER,
    SD15_UNET,
    SD15_UNET_PARAMS,
    SD15_VAE,
    SDXL_TEXT_ENCODER,
    SDXL_SKETCH_ADAPTER,
    SDXL_TEXT_ENCODER_2,
    SDXL_UNET,
    SDXL_UNION_PROMAX,
    SDXL_UNET_PARAMS,
    SDXL_VAE_FP16_FIX,
    VAE_PARAMS,
)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    ModelMixin,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers import __version__ as diffusers_version  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402
from transformers import logging as transformers_logging  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from studio.a1111.schedulers import make_scheduler  # noqa: E402
from studio.core.devices import (  # noqa: E402
    default_device_budget,
    default_ram_budget,
    dtype_name,
    format_bytes,
    free_device_bytes,
)
from studio.core.errors import NumericalError, OutOfMemoryBudget  # noqa: E402
from studio.core.jobs import LocalJob  # noqa: E402
from studio.core.memory import ModelManager  # noqa: E402
from studio.core.model_records import DEVICE, ModelKey  # noqa: E402
from studio.models import upscalers  # noqa: E402
from studio.models.basicsr_compat import rrdbnet_class  # noqa: E402
from studio.models.components import DiffusersModels  # noqa: E402
from studio.models.controlnets import ControlNetCatalog, ControlNetPreset  # noqa: E402
from studio.models.families import family_named, family_of  # noqa: E402
from studio.models.loading import KIND, DiffusersLoader, split_part  # noqa: E402
from studio.models.loras import LoraCatalog  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.models.stages import FLOAT8, has_nan_or_inf  # noqa: E402
from studio.tasks.control import ControlUnit  # noqa: E402
from studio.models.upscalers import ReleaseFiles, UpscalerCatalog, UpscalerPreset  # noqa: E402
from studio.tasks.engines import Engines, ManagerSettings, build_engines, build_manager  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402
from studio.tasks.hires import HiresFix  # noqa: E402
from studio.tasks.previews import DEFAULT_PREVIEW_EVERY, OFF  # noqa: E402
from studio.tasks.inpainting import InpaintRequest  # noqa: E402
from studio.tasks.upscaling import UpscaleRequest  # noqa: E402

GIB, MIB = 1024**3, 1024**2
PROMPT, NEGATIVE = "a lighthouse on a cliff at sunset, oil painting, detailed", "blurry, low quality"
SCHEDULER = "DPM++ 2M Karras"
# cases not started by then are skipped: with the longest case (~40 s; SD 3.5's and FLUX's about 30 s each, their
# weights made twice per case: ~60 s at worst) the run stays within 8.5 min
TIME_LIMIT_S = 420
SPEED_TARGET = 0.97
PREVIEW_COST_TARGET = 1.03  # issue [4/7]: previews at the default interval cost at most 3% of the image's time
SD15, SDXL, UPSCALER_NAME = "sd15-random", "sdxl-random", "x4plus-random"
# the control models' folders (and their names in the ControlNet catalog)
CONTROLNET_SD15, UNION_SDXL, ADAPTER_SDXL = "controlnet-sd15-random", "union-sdxl-random", "adapter-sdxl-random"
TAESD_SD15 = "taesd-sd15-random"  # SD 1.5's live previews' tiny decoder (madebyollin/taesd's config: the defaults)
# the flow-matching presets (SD 3.5 Large's and FLUX.1-dev's sizes); their summary names are the part before "-"
FLUX, SD35 = "flux-dev-random", "sd35-large-random"
FLOW_SCHEDULER = "Euler"
PLAIN, STORED, STREAMED = "as planned", "float8 storage", "block streaming"  # the flow cases' denoise placements
# float8 (e4m3: 3 mantissa bits) against bfloat16 or float32: tests/test_flow_memory.py's tiny FLUX moved 0.45 levels
# (of 255) on average, 3 at most; its tolerance, mean <= 1.5 levels, is this run's mark (on 1024² a max is noise)
FLOAT8_MEAN_LEVELS = 1.5


# ===== 3. Sizes: the real run and the smoke run =====

@dataclasses.dataclass(frozen=True)
class FlowModel:
    """A flow-matching preset of this run: its weighted components (role -> (class, config.json dict)), made with
    random weights at every load (RandomWeights: no weight files), and the device budgets (CUDA) under which its
    denoise stage must store the transformer in float8, and stream its blocks from RAM (bench/device_plan.py's)."""

    family: str
    label: str
    pipeline: str  # model_index.json's class
    components: dict
    scheduler: dict  # the repo's scheduler_config.json (FlowMatchEulerDiscreteScheduler)
    guidance: float  # the preset's CFG (FLUX.1-dev: 1, its distilled guidance 3.5 instead)
    float8_budget: int
    streaming_budget: int
    distilled_guidance: float | None = None
    published: dict = dataclasses.field(default_factory=dict)  # role -> the published parameter count


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the GPU run and the smoke run differ in; everything else is the same code."""

    device: torch.device
    dtype: torch.dtype
    configs: dict  # folder name -> {role: (class, config.json dict)}
    controls: dict  # folder name -> (class, config.json dict): SD 1.5's ControlNet, SDXL's Union and T2I-Adapter
    upscaler: dict  # the RRDBNet's config.json
    preview_decoder: dict  # SD 1.5's TAESD's config.json (AutoencoderTiny)
    side: dict  # preset -> the side of its images
    hires: dict  # preset -> Hires. fix's factor
    steps: int
    hires_steps: int
    timed_runs: int
    time_limit_s: float
    flow: dict  # preset -> FlowModel: SD 3.5 Large's and FLUX.1-dev's sizes, or tiny ones
    flow_side: int
    flow_steps: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def real_sizes() -> Sizes:
    configs = {
        "sd15": {"unet": (UNet2DConditionModel, SD15_UNET), "vae": (AutoencoderKL, SD15_VAE),
                 "text_encoder": (CLIPTextModel, SD15_TEXT_ENCODER)},
        "sdxl": {"unet": (UNet2DConditionModel, SDXL_UNET), "text_encoder": (CLIPTextModel, SDXL_TEXT_ENCODER),
                 "text_encoder_2": (CLIPTextModelWithProjection, SDXL_TEXT_ENCODER_2)},
        "sdxl-vae": {"": (AutoencoderKL, SDXL_VAE_FP16_FIX)},
    }
    upscaler = {"arch": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 23,
                "num_grow_ch": 32, "scale": 4}
    controls = {CONTROLNET_SD15: (ControlNetModel, SD15_CONTROLNET), UNION_SDXL: (ControlNetUnionModel, SDXL_UNION_PROMAX),
                ADAPTER_SDXL: (T2IAdapter, SDXL_SKETCH_ADAPTER)}
    def components(repo: str) -> dict:
        return {role: (component_class, config) for (source, role), (component_class, config, _count)
                in FLOW_COMPONENTS.items() if source == repo}

    def published(repo: str) -> dict:
        return {role: count for (source, role), (_class, _config, count) in FLOW_COMPONENTS.items() if source == repo}

    # FLUX.1-dev's 16 and 8 GiB and SD 3.5 Large's 12 and 8 GiB: bench/device_plan.py plans the denoise stage there
    # with float8 storage, and with the transformer's blocks streamed (float8 too)
    flow = {
        FLUX: FlowModel("flux", "FLUX.1-dev size", "FluxPipeline", components(FLUX_DEV), FLUX_SCHEDULER_CONFIG,
                        guidance=1.0, distilled_guidance=3.5, float8_budget=16 * GIB, streaming_budget=8 * GIB,
                        published=published(FLUX_DEV)),
        SD35: FlowModel("sd3", "SD 3.5 Large size", "StableDiffusion3Pipeline", components(SD35_LARGE),
                        SD3_SCHEDULER_CONFIG, guidance=3.5, float8_budget=12 * GIB, streaming_budget=8 * GIB,
                        published=published(SD35_LARGE)),
    }
    return Sizes(torch.device("cuda"), torch.float16, configs, controls, upscaler, {}, {SD15: 512, SDXL: 1024},
                 {SD15: 2.0, SDXL: 1.5}, steps=20, hires_steps=10, timed_runs=3, time_limit_s=TIME_LIMIT_S,
                 flow=flow, flow_side=1024, flow_steps=8)


def tiny_sizes() -> Sizes:
    """diffusers' own test configs (tests/tiny_models.py's), at 64 px."""
    unet = dict(block_out_channels=[32, 64], layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8)
    sdxl_unet = dict(block_out_channels=[32, 64], layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                     transformer_layers_per_block=[1, 2], projection_class_embeddings_input_dim=80,
                     cross_attention_dim=80)  # both encoders' widths side by side; pooled 32 + 6 time ids x 8
    vae = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=514,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32, layer_norm_eps=1e-5)
    configs = {
        "sd15": {"unet": (UNet2DConditionModel, unet), "vae": (AutoencoderKL, vae),
                 "text_encoder": (CLIPTextModel, text)},
        "sdxl": {"unet": (UNet2DConditionModel, sdxl_unet), "text_encoder": (CLIPTextModel, text),
                 "text_encoder_2": (CLIPTextModelWithProjection, {**text, "hidden_size": 48})},
        "sdxl-vae": {"": (AutoencoderKL, vae)},
    }
    upscaler = {"arch": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1, "num_grow_ch": 4,
                "scale": 4}
    controlnet = dict(block_out_channels=[32, 64], layers_per_block=2, in_channels=4,
                      conditioning_embedding_out_channels=[16, 32])  # the tiny VAE's 2x
    controls = {
        CONTROLNET_SD15: (ControlNetModel, {**controlnet, "down_block_types": unet["down_block_types"],
                                            "cross_attention_dim": 32, "attention_head_dim": 8}),
        UNION_SDXL: (ControlNetUnionModel, {
            **controlnet, **{key: sdxl_unet[key] for key in (
                "down_block_types", "attention_head_dim", "use_linear_projection", "addition_embed_type",
                "addition_time_embed_dim", "transformer_layers_per_block", "projection_class_embeddings_input_dim",
                "cross_attention_dim")},
            "num_control_type": 8, "num_trans_channel": 32, "num_proj_channel": 32}),
        ADAPTER_SDXL: (T2IAdapter, {"adapter_type": "full_adapter_xl", "channels": [32, 64, 64, 64],
                                    "downscale_factor": 4, "in_channels": 3, "num_res_blocks": 1}),
    }
    # the tiny VAE's two blocks: one upsampling, as its decoder's
    taesd = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
                 num_decoder_blocks=[1, 1])
    # SD 3 and FLUX (tests/tiny_flow_models.py's shapes, wider): the transformer several times T5 and CLIP together,
    # T5 larger than the VAE, so that weights budgets can stand for the GPU's (Check.smoke_weights_budgets); a VAE
    # that downsamples by 2
    flow_vae = dict(block_out_channels=[8, 16], norm_num_groups=8, in_channels=3, out_channels=3, latent_channels=16,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    t5 = dict(vocab_size=100, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)  # the tokenizer's 98 pieces
    flux = {"transformer": (FluxTransformer2DModel, dict(
                patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=[8, 12, 12])),
            "text_encoder": (CLIPTextModel, text),
            "text_encoder_2": (T5EncoderModel, {**t5, "d_model": 64, "d_ff": 128}),
            "vae": (AutoencoderKL, {**flow_vae, "scaling_factor": 0.3611, "shift_factor": 0.1159})}
    sd3 = {"transformer": (SD3Transformer2DModel, dict(
               sample_size=32, patch_size=1, in_channels=16, num_layers=3, attention_head_dim=32, num_attention_heads=4,
               caption_projection_dim=128, joint_attention_dim=96, pooled_projection_dim=64, out_channels=16)),
           "text_encoder": (CLIPTextModelWithProjection, text),
           "text_encoder_2": (CLIPTextModelWithProjection, {**text, "hidden_size": 48}),
           "text_encoder_3": (T5EncoderModel, {**t5, "d_model": 96, "d_ff": 192}),  # wider than both CLIPs' 80
           "vae": (AutoencoderKL, {**flow_vae, "scaling_factor": 1.5305, "shift_factor": 0.0609})}
    flow = {  # the budgets: the smoke run limits the weights a lease may place instead (Check.flow_limited)
        FLUX: FlowModel("flux", "tiny FLUX.1", "FluxPipeline", flux, FLUX_SCHEDULER_CONFIG, guidance=1.0,
                        distilled_guidance=3.5, float8_budget=0, streaming_budget=0),
        SD35: FlowModel("sd3", "tiny SD 3", "StableDiffusion3Pipeline", sd3, SD3_SCHEDULER_CONFIG, guidance=3.5,
                        float8_budget=0, streaming_budget=0),
    }
    return Sizes(torch.device("cpu"), torch.float32, configs, controls, upscaler, taesd, {SD15: 64, SDXL: 64},
                 {SD15: 1.5, SDXL: 1.5},
                 steps=2, hires_steps=1, timed_runs=1, time_limit_s=float("inf"), flow=flow, flow_side=64,
                 flow_steps=2)


# The published parameter counts of the real components (bench/device_plan.py): the real run prints them beside its own
PUBLISHED_PARAMS = {
    ("sd15", "unet"): SD15_UNET_PARAMS, ("sd15", "vae"): VAE_PARAMS, ("sd15", "text_encoder"): CLIP_L_TEXT_PARAMS,
    ("sdxl", "unet"): SDXL_UNET_PARAMS, ("sdxl", "text_encoder"): CLIP_L_TEXT_PARAMS,
    ("sdxl", "text_encoder_2"): CLIP_BIGG_TEXT_PROJ_PARAMS, ("sdxl-vae", ""): VAE_PARAMS,
}
# The repos' scheduler_config.json (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0)
SCHEDULERS = {
    "sd15": (PNDMScheduler, {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                             "steps_offset": 1, "clip_sample": False}),
    "sdxl": (EulerDiscreteScheduler, {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                      "interpolation_type": "linear", "num_train_timesteps": 1000,
                                      "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
                                      "use_karras_sigmas": False}),
}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# black-forest-labs/FLUX.1-dev's and stabilityai/stable-diffusion-3.5-large's scheduler_config.json
FLUX_SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                         "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
TOKENIZERS = {"sd15": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}


# ===== 4. Random-weight model folders =====

def byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer made offline (shared/NOTES.md): the 256 byte characters, each also with '</w>' (a word's last
    character), then the two special tokens last, as in CLIP's vocabulary; no merges: one token per character."""
    characters = list(bytes_to_unicode().values())
    vocab = {character: index for index, character in enumerate(characters)}
    vocab |= {f"{character}</w>": 256 + index for index, character in enumerate(characters)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_module(component_class: type, config: dict, tokenizer: CLIPTokenizer, sizes: Sizes) -> nn.Module:
    """The component with random weights, made on the device (its default device while the layers are made)."""
    with torch.device(sizes.device):
        if issubclass(component_class, ModelMixin):
            module = component_class.from_config(config)
        else:  # a text encoder: its special tokens are the tokenizer's
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
            module = component_class(CLIPTextConfig.from_dict({**config, **ids}))
    return module.to(sizes.dtype).eval()


def all_finite(module: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all())


def write_folder(folder: Path, name: str, sizes: Sizes, tokenizer: CLIPTokenizer) -> None:
    """One diffusers folder (a pipeline's, or a standalone VAE's when its role is ""), written component by
    component: each built on the device, checked, saved and let go before the next."""
    for role, (component_class, config) in sizes.configs[name].items():
        began = time.perf_counter()
        torch.manual_seed(0)
        module = build_module(component_class, config, tokenizer, sizes)
        built = time.perf_counter()
        module.save_pretrained(folder / role, safe_serialization=True)
        count = sum(p.numel() for p in module.parameters())
        published = PUBLISHED_PARAMS.get((name, role)) if sizes.cuda else None
        print(f"  {name}/{role or 'vae'}: {component_class.__name__}, {count:,} parameters"
              + (f" (published {published:,})" if published else "")
              + f", on {next(module.parameters()).device}, {'finite' if all_finite(module) else 'NOT FINITE'}; "
              f"built {built - began:.1f} s, saved {time.perf_counter() - built:.1f} s")
        del module
        release(sizes.device)
    if name in PIPELINES:
        scheduler_class, scheduler_config = SCHEDULERS[name]
        scheduler_class.from_config(scheduler_config).save_pretrained(folder / "scheduler")
        for role in TOKENIZERS[name]:
            tokenizer.save_pretrained(folder / role)
        write_model_index(folder, name, sizes.configs[name])


def write_model_index(folder: Path, name: str, components: dict) -> None:
    """model_index.json: which class each component is (the studio's loader reads it)."""
    index = {"_class_name": PIPELINES[name], "_diffusers_version": diffusers_version,
             "scheduler": ["diffusers", SCHEDULERS[name][0].__name__]}
    index |= {role: ["transformers", "CLIPTokenizer"] for role in TOKENIZERS[name]}
    for role, (component_class, _config) in components.items():
        library = "diffusers" if issubclass(component_class, ModelMixin) else "transformers"
        index[role] = [library, component_class.__name__]
    if name == "sd15":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


class ResidualDenseBlock(nn.Module):
    """basicsr 1.4.2's (basicsr/archs/rrdbnet_arch.py, Apache-2.0), with its initialisation: used when basicsr is not
    installed (it needs cv2, scipy and torchvision to import). Same module names, so the same state-dict keys."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):  # basicsr's default_init_weights
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data *= 0.1
            conv.bias.data.fill_(0)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """basicsr 1.4.2's RRDBNet (ESRGAN; pixel unshuffle for ×2 and ×1), as Real-ESRGAN's x4plus uses it."""

    def __init__(self, num_in_ch, num_out_ch, scale=4, num_feat=64, num_block=23, num_grow_ch=32):
        super().__init__()
        self.scale = scale
        num_in_ch *= {2: 4, 1: 16}.get(scale, 1)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        feat = nn.functional.pixel_unshuffle(x, {2: 2, 1: 4}[self.scale]) if self.scale in (1, 2) else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(nn.functional.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(nn.functional.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def rrdbnet_in_use() -> str:
    """basicsr's RRDBNet where it imports; otherwise the copy above, registered as the studio's RRDBNet. Where both
    exist, the copy is checked against basicsr's: same keys, same output."""
    try:
        basicsr_rrdbnet = rrdbnet_class()
    except Exception as error:  # noqa: BLE001 - ImportError, or what an incompatible basicsr raises
        upscalers.ARCHITECTURES["RRDBNet"] = lambda: RRDBNet
        return f"the copy of basicsr's RRDBNet in this script (basicsr: {type(error).__name__}: {error})"
    arguments = dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=2, num_grow_ch=4)
    torch.manual_seed(0)
    theirs, ours = basicsr_rrdbnet(**arguments).eval(), RRDBNet(**arguments).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    sample = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        difference = float((theirs(sample) - ours(sample)).abs().max())
    return (f"basicsr's RRDBNet (this script's copy, used where basicsr is missing: same keys, max |difference| "
            f"{difference:g})")


def write_upscaler(folder: Path, sizes: Sizes) -> None:
    """An upscaler folder as the studio's UpscalerLoader reads one: config.json and one .safetensors."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    with torch.device(sizes.device):
        network = upscalers.build_network(sizes.upscaler)
    state = {name: tensor.to("cpu", sizes.dtype).contiguous() for name, tensor in network.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(sizes.upscaler))
    count = sum(p.numel() for p in network.parameters())
    print(f"  upscaler: {type(network).__module__}.{type(network).__name__} {sizes.upscaler['num_feat']} features, "
          f"{sizes.upscaler['num_block']} blocks, {count:,} parameters (Real-ESRGAN x4plus: 16,697,987)")


def write_presets(folder: Path, sizes: Sizes, sd: bool = True) -> Path:
    """The presets file: a `local:` folder each, SDXL's VAE as a `components:` folder (as sdxl-base-1.0 has it);
    the flow models as presets/models.yaml has FLUX.1-dev and SD 3.5 Large (`sd`: SD 1.5's and SDXL's too)."""
    common = {"description": "Random weights (bench/gpu_check.py).", "min_size": 64, "default_scheduler": SCHEDULER}
    presets = {
        SD15: {**common, "label": "SD 1.5, random weights", "family": "sd15", "local": "./sd15", "max_size": 1024,
               "preview_decoder": f"./{TAESD_SD15}",
               "default_width": sizes.side[SD15], "default_height": sizes.side[SD15]},
        SDXL: {**common, "label": "SDXL, random weights", "family": "sdxl", "local": "./sdxl", "max_size": 1536,
               "components": {"vae": "./sdxl-vae"}, "default_width": sizes.side[SDXL],
               "default_height": sizes.side[SDXL]},
    } if sd else {}
    for name, model in sizes.flow.items():
        presets[name] = {**common, "label": f"{model.label}, random weights", "family": model.family,
                         "local": f"./{name}", "max_size": 2048, "size_step": 16, "default_scheduler": FLOW_SCHEDULER,
                         "default_guidance": model.guidance, "default_width": sizes.flow_side,
                         "default_height": sizes.flow_side}
        if model.distilled_guidance is not None:
            presets[name]["distilled_guidance"] = model.distilled_guidance
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"default": next(iter(presets)), "presets": presets}, sort_keys=False))
    return path


def write_models(folder: Path, sizes: Sizes, sd: bool = True) -> None:
    """Every model folder (`sd`: SD 1.5's and SDXL's, the upscaler's and the control models' too)."""
    tokenizer = byte_level_tokenizer()
    if sd:
        write_sd_models(folder, sizes, tokenizer)
    print("the flow models' folders (configs, scheduler, tokenizers; the weights made at each load, on "
          f"{sizes.device}):")
    for name, model in sizes.flow.items():
        load_dtype = family_named(model.family).compute_dtype(sizes.dtype)
        write_flow_folder(folder / name, model, sizes, tokenizer, clip_ids_of(tokenizer), load_dtype)


def write_sd_models(folder: Path, sizes: Sizes, tokenizer: CLIPTokenizer) -> None:
    print(f"random weights on {sizes.device}, {dtype_name(sizes.dtype)}, saved to {folder}:")
    for name in sizes.configs:
        write_folder(folder / name, name, sizes, tokenizer)
    write_upscaler(folder / UPSCALER_NAME, sizes)
    torch.manual_seed(0)
    taesd = build_module(AutoencoderTiny, sizes.preview_decoder, tokenizer, sizes)
    taesd.save_pretrained(folder / TAESD_SD15, safe_serialization=True)
    print(f"  {TAESD_SD15}: AutoencoderTiny, {sum(p.numel() for p in taesd.parameters()):,} parameters")
    del taesd
    for name, (model_class, config) in sizes.controls.items():
        torch.manual_seed(0)
        module = build_module(model_class, config, tokenizer, sizes)
        module.save_pretrained(folder / name, safe_serialization=True)
        print(f"  {name}: {model_class.__name__}, {sum(p.numel() for p in module.parameters()):,} parameters")
        del module
        release(sizes.device)


def t5_tokenizer() -> T5TokenizerFast:
    """tests/tiny_flow_models.py's T5 tokenizer, made offline: SentencePiece-style pieces for the printable ASCII
    characters (one token per character), T5's ids (<pad> 0, </s> 1, <unk> 2)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(character, -3.0) for character in string.printable if not character.isspace()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Layers made meanwhile have their weights in `dtype` from the start (no float32 copy of 12 B parameters)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def flow_module(component_class: type, config: dict, clip_ids: dict) -> nn.Module:
    """A flow model's component from its config, with the class's own initialisation, on the default device."""
    if issubclass(component_class, ModelMixin):
        return component_class.from_config(config)
    if component_class is T5EncoderModel:  # T5's special ids are t5_tokenizer's (T5Config's defaults)
        return T5EncoderModel(T5Config(**config))
    return component_class(CLIPTextConfig.from_dict({**config, **clip_ids}))


def tensor_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Its parameters' and buffers' bytes, the floating ones in `dtype`: what the manager counts once it is loaded
    in `dtype` (tied weights once)."""
    width = torch.finfo(dtype).bits // 8
    return sum(tensor.numel() * (width if tensor.is_floating_point() else tensor.element_size())
               for tensor in itertools.chain(module.parameters(), module.buffers()))


class RandomWeights:
    """The manager's loader of diffusers components: the studio's (`files`, DiffusersLoader) for every folder but
    the flow models', whose weighted components have no files: FLUX.1-dev's would be 33 GB and SD 3.5 Large's 26 GB
    to write, and each of the three cases per model loads them again. Each load makes the component anew from its
    config instead, seeded (every case gets the very same weights, so images compare), on CUDA on the GPU in the
    load dtype (the class's own initialisation: a second or two for FLUX's 11.9 B parameters), then moved to RAM,
    where a loader leaves a model for the manager to place; the peak-memory statistics are then reset (the case's
    peak is the engine's, not this). `size` is exact: its tensors' bytes in the dtype asked (a build on meta)."""

    def __init__(self, files: DiffusersLoader, flow: dict, folder: Path, device: torch.device, clip_ids: dict):
        self.files, self.device, self.clip_ids = files, device, clip_ids
        self.specs = {(str((folder / preset).resolve()), role): (component_class, config, seed)
                      for preset, model in flow.items()
                      for seed, (role, (component_class, config)) in enumerate(model.components.items())}
        self._meta: dict[tuple[str, str], nn.Module] = {}
        self.made: list[tuple[str, float, bool]] = []  # (component, seconds, finite), for the case's report

    def _spec_key(self, key: ModelKey) -> tuple[str, str] | None:
        spec_key = (str(Path(key.source).resolve()), split_part(key.part)[0])
        return spec_key if spec_key in self.specs else None

    def meta(self, spec_key: tuple[str, str]) -> nn.Module:
        if spec_key not in self._meta:
            component_class, config, _seed = self.specs[spec_key]
            with torch.device("meta"):
                self._meta[spec_key] = flow_module(component_class, config, self.clip_ids)
        return self._meta[spec_key]

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        spec_key = self._spec_key(key)
        return self.files.size(key, dtype) if spec_key is None else tensor_bytes(self.meta(spec_key), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype):
        spec_key = self._spec_key(key)
        if spec_key is None:
            return self.files.load(key, dtype)
        component_class, config, seed = self.specs[spec_key]
        began = time.perf_counter()
        torch.manual_seed(seed)
        with torch.device(self.device), default_dtype(dtype):
            module = flow_module(component_class, config, self.clip_ids)
        module = module.to(dtype).eval()
        finite = all_finite(module)
        module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.made.append((f"{Path(key.source).name}/{spec_key[1]}", time.perf_counter() - began, finite))
        return module


def write_flow_folder(folder: Path, model: FlowModel, sizes: Sizes, clip: CLIPTokenizer, clip_ids: dict,
                      loader_dtype: torch.dtype) -> None:
    """A flow model's diffusers folder without weights: model_index.json, each weighted component's config.json
    (from a build on meta: its parameters counted), the scheduler and the tokenizers (CLIP's byte-level one, T5's
    character-level one). RandomWeights makes the weights at each load."""
    family = family_named(model.family)
    index = {"_class_name": model.pipeline, "_diffusers_version": diffusers_version,
             "scheduler": ["diffusers", FlowMatchEulerDiscreteScheduler.__name__]}
    for role, (component_class, config) in model.components.items():
        with torch.device("meta"):
            module = flow_module(component_class, config, clip_ids)
        if isinstance(module, ModelMixin):
            module.save_config(folder / role)
        else:
            module.config.save_pretrained(folder / role)
        library = "diffusers" if isinstance(module, ModelMixin) else "transformers"
        index[role] = [library, component_class.__name__]
        count = sum(p.numel() for p in module.parameters())
        published = model.published.get(role) if sizes.cuda else None
        if isinstance(published, float):  # SD 3.5's rounded counts include the position table (a buffer)
            with_buffers = count + sum(buffer.numel() for buffer in module.buffers())
            shown = f" (published {published / 1e9:.1f} B with its buffers: {with_buffers / 1e9:.2f} B)"
        else:
            shown = f" (published {published:,})" if published else ""
        print(f"  {folder.name}/{role}: {component_class.__name__}, {count:,} parameters{shown}, "
              f"{format_bytes(tensor_bytes(module, loader_dtype))} in {dtype_name(loader_dtype)}")
    FlowMatchEulerDiscreteScheduler.from_config(model.scheduler).save_pretrained(folder / "scheduler")
    for role in family.tokenizers:
        tokenizer = t5_tokenizer() if role == family.t5_tokenizer else clip
        tokenizer.save_pretrained(folder / role)
        index[role] = ["transformers", type(tokenizer).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def clip_ids_of(tokenizer: CLIPTokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def control_catalog(folder: Path) -> ControlNetCatalog:
    """The control models as the studio's catalog offers them (presets/controlnets.yaml's fields)."""
    return ControlNetCatalog([
        ControlNetPreset(CONTROLNET_SD15, "ControlNet, random weights", "sd15", local=folder / CONTROLNET_SD15,
                         preprocessor="scribble"),
        ControlNetPreset(UNION_SDXL, "Union ProMax size, random weights", "sdxl", kind="controlnet_union",
                         local=folder / UNION_SDXL, preprocessor="scribble", control_types=(("scribble", 2),)),
        ControlNetPreset(ADAPTER_SDXL, "Sketch T2I-Adapter size, random weights", "sdxl", kind="t2i_adapter",
                         local=folder / ADAPTER_SDXL, preprocessor="scribble"),
    ])


# ===== 5. Measuring the engine =====

@dataclasses.dataclass
class StageRecord:
    case: str
    stage: str
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    reserved: int = 0  # the manager's reserved working memory as the stage's work starts
    manager_bytes: int = 0  # bytes the manager records on the device then
    allocated: int | None = None  # torch.cuda.memory_allocated then
    used: int | None = None  # torch.cuda.max_memory_allocated during the work, minus `allocated`
    seconds: float = 0.0  # the work, models placed (the denoise stage: the pipeline's loop)
    work_seconds: float = 0.0  # the work alone (block streaming: without setting its hooks up and taking them off)
    nan: bool | None = None
    failed: str = ""
    tiles: int = 1
    stored: list[str] = dataclasses.field(default_factory=list)  # its models stored in float8 (the manager's books)

    @property
    def how(self) -> str:
        return " → ".join(self.fallbacks) or "as planned"


class Probe:
    """Watches one Engines: wraps (on the instances) DiffusionStages.run_stage, _run_offloaded and _run_streamed
    and the manager's use and offload_idle, so that every stage, whichever task runs it, leaves a StageRecord. The
    fallbacks it took are noted as they are tried: idle models off, float8 storage (a lease asked to store models
    in float8), model CPU offload, block streaming; the last one is the placement that ran."""

    def __init__(self, engines: Engines):
        self.manager, self.stages = engines.manager, engines.stages
        self.cuda = self.manager.device.type == "cuda"
        self.records: list[StageRecord] = []
        self.case_name = ""
        self.current: StageRecord | None = None
        self.conditioning = None  # the last encode stage's embeddings (the bare pipeline takes the same)
        self.case_peak = 0
        self.stages.run_stage = functools.partial(self._run_stage, self.stages.run_stage)
        self.stages._run_offloaded = functools.partial(self._run_offloaded, self.stages._run_offloaded)
        self.stages._run_streamed = functools.partial(self._run_streamed, self.stages._run_streamed)
        self.manager.use = functools.partial(self._use, self.manager.use)
        self.manager.offload_idle = functools.partial(self._offload_idle, self.manager.offload_idle)

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[None]:
        self.case_name, self.case_peak = name, 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            if self.cuda:
                self.case_peak = max(self.case_peak, torch.cuda.max_memory_allocated())

    def of_case(self, name: str) -> list[StageRecord]:
        return [record for record in self.records if record.case == name]

    def _new(self, stage: str) -> StageRecord:
        record = StageRecord(self.case_name, stage)
        self.records.append(record)
        return record

    def _run_stage(self, original, plan_for, work, can_tile=False, **fallbacks):
        record = self._new("?")
        before = [r for r in self.of_case(self.case_name) if r is not record]

        def planned(tiled):
            plan = plan_for(tiled)
            retry = plan.stage == "decode" and before and before[-1].stage.startswith("decode") and before[-1].nan
            record.stage = "decode (fp32)" if retry else plan.stage
            if tiled and "VAE tiling" not in record.fallbacks:
                record.fallbacks.append("VAE tiling")
            return plan

        def watched(models, plan):
            """The work, as it starts: what the manager reserves now (block streaming adds its blocks' room once
            the lease is made) and which of the stage's models are stored in float8."""
            status = self.manager.status()
            record.reserved = max(record.reserved, status.reserved)
            record.stored = [model.component or Path(model.source).name for model in status.models
                             if model.in_use and model.dtype == dtype_name(FLOAT8)]
            began = time.perf_counter()
            try:
                return work(models, plan)
            finally:
                synchronize(self.manager.device)
                record.work_seconds = time.perf_counter() - began

        self.current = record
        try:
            result = original(planned, watched, can_tile, **fallbacks)
        except BaseException as error:
            record.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise
        finally:
            self.current = None
        record.nan = any(has_nan_or_inf(tensor) for tensor in tensors_in(result))
        if record.stage == "encode":
            self.conditioning = result[0]
        return result

    def _run_offloaded(self, original, plan, work):
        if self.current is not None:
            self.current.fallbacks.append("model CPU offload")
        return original(plan, work)

    def _run_streamed(self, original, plan, work, streamed):
        if self.current is not None:
            self.current.fallbacks.append(STREAMED)
        return original(plan, work, streamed)

    def _offload_idle(self, original):
        if self.current is not None:
            self.current.fallbacks.append("idle models off")
        return original()

    @contextlib.contextmanager
    def _use(self, original, keys, working_memory=0, on_device=True, **options):
        if self.current is not None and options.get("storage") and STORED not in self.current.fallbacks:
            self.current.fallbacks.append(STORED)
        with original(keys, working_memory, on_device, **options) as models:
            record = self.current
            watch = []
            if record is None:  # not a diffusion stage: an upscaler's tile
                record = self._upscale_record()
                watch = [nan_watch(model, record) for model in models.values() if isinstance(model, nn.Module)]
            allocated, began = self._start(record)
            try:
                yield models
            finally:
                self._stop(record, allocated, began)
                for handle in watch:
                    handle.remove()

    def _upscale_record(self) -> StageRecord:
        last = self.records[-1] if self.records else None
        if last is not None and last.case == self.case_name and last.stage == "upscale":
            last.tiles += 1
            return last
        record = self._new("upscale")
        record.nan = False
        return record

    def _start(self, record: StageRecord) -> tuple[int | None, float]:
        """The manager's books and torch's allocation as the work starts (models placed); the peak reset. A stage
        that tries again keeps the figures of its last try; an upscale keeps the largest of its tiles'."""
        status = self.manager.status()
        tiles = record.stage == "upscale"
        record.reserved = max(record.reserved, status.reserved) if tiles else status.reserved
        record.manager_bytes = status.device_used
        if self.cuda:
            torch.cuda.synchronize()
            self.case_peak = max(self.case_peak, torch.cuda.max_memory_allocated())
            record.allocated = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return record.allocated, time.perf_counter()

    def _stop(self, record: StageRecord, allocated: int | None, began: float) -> None:
        tiles = record.stage == "upscale"
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.case_peak = max(self.case_peak, peak)
            record.used = max(record.used or 0, peak - allocated) if tiles else peak - allocated
        seconds = time.perf_counter() - began
        record.seconds = record.seconds + seconds if tiles else seconds


def nan_watch(module: nn.Module, record: StageRecord):
    """A forward hook that notes NaN or inf in the module's output (for the upscaler, whose image is clipped)."""
    def hook(_module, _inputs, output):
        record.nan = record.nan or any(has_nan_or_inf(tensor) for tensor in tensors_in(output))

    return module.register_forward_hook(hook)


def tensors_in(value) -> Iterator[torch.Tensor]:
    """The tensors in a stage's result: a tensor, tuples and lists, dicts, an object with `embeds`."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif hasattr(value, "embeds"):
        yield from tensors_in(value.embeds)


def placement_problems(manager: ModelManager) -> tuple[int, list[str]]:
    """(records checked, problems): every model the manager records, its recorded placement against where all its
    parameters and buffers are, and any accelerate hook still on it."""
    checked, problems = 0, []
    for record in manager.status().models:
        module = manager.loaded_object(ModelKey(record.kind, record.source, record.component))
        if not isinstance(module, nn.Module):
            continue
        checked += 1
        expected = manager.device.type if record.placement == DEVICE else "cpu"
        found = sorted({tensor.device.type for tensor in itertools.chain(module.parameters(), module.buffers())})
        label = f"{Path(record.source).name}/{record.component}" if record.component else Path(record.source).name
        if found != [expected]:
            problems.append(f"{label}: recorded {record.placement} ({expected}), its tensors are on {', '.join(found)}")
        if hasattr(module, "_hf_hook"):
            problems.append(f"{label}: an accelerate hook is still attached")
    return checked, problems


# ===== 6. The cases =====

@dataclasses.dataclass
class Findings:
    cases: int = 0
    stages: int = 0
    nan_stages: int = 0
    over_reserved: int = 0
    mismatches: int = 0
    unexpected: int = 0  # errors other than the studio's own
    speed: dict = dataclasses.field(default_factory=dict)  # preset -> studio / bare
    preview_ratio: float | None = None  # SD 1.5's image time with TAESD previews / without
    float8_difference: dict = dataclasses.field(default_factory=dict)  # flow model -> (mean, max) levels vs plain
    streaming_ratio: dict = dataclasses.field(default_factory=dict)  # flow model -> denoise seconds streamed / plain
    placements: list = dataclasses.field(default_factory=list)  # (case, expected, how the denoise stage ran, reached)
    crashed: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)


class Check:
    """The whole run: the model folders, the engines, the cases, and what they found."""

    def __init__(self, sizes: Sizes, folder: Path, sd: bool = True):
        self.sizes, self.folder, self.sd = sizes, folder, sd
        self.presets = load_presets(write_presets(folder, sizes, sd))
        self.upscalers = UpscalerCatalog({UPSCALER_NAME: UpscalerPreset(
            UPSCALER_NAME, "RRDBNet, x4plus size, random weights", folder=str(folder / UPSCALER_NAME))}, UPSCALER_NAME)
        self.findings = Findings()
        self.images: dict[str, Image.Image] = {}
        files = DiffusersLoader(DiffusersModels(sizes.device).variant_for(self.presets))
        self.random_weights = RandomWeights(files, sizes.flow, folder, sizes.device,
                                            clip_ids_of(byte_level_tokenizer()))
        self.flow_plain: dict[str, tuple[np.ndarray, float]] = {}  # flow model -> (plain image, denoise seconds)

    # ----- engines -----

    def engines(self, device_budget: int | None = None, flow: bool = False) -> Engines:
        """The studio's engines from its own factory, as app.py builds them for a GPU (its budget and free-memory
        report). `flow`: the flow models' weights made at each load (RandomWeights)."""
        device = self.sizes.device
        loaders = {KIND: self.random_weights} if flow else {}
        if self.sizes.cuda:
            settings = ManagerSettings(device=device, device_budget=device_budget or default_device_budget(device),
                                       dtype=self.sizes.dtype, ram_budget=default_ram_budget(),
                                       free_memory=functools.partial(free_device_bytes, device),
                                       extra_loaders=loaders)
        else:
            settings = ManagerSettings(device=device, device_budget=device_budget or 8 * GIB, dtype=self.sizes.dtype,
                                       extra_loaders=loaders)
        manager, models = build_manager(self.presets, settings)
        return build_engines(manager, models, self.presets, loras=LoraCatalog({}), upscalers=self.upscalers,
                             release_files=ReleaseFiles(self.folder / "release-files", offline=True),
                             controlnets=control_catalog(self.folder))

    def run_case(self, title: str, function: Callable[[], None]) -> None:
        if time.perf_counter() - STARTED > self.sizes.time_limit_s:
            print(f"\n== {title}: SKIPPED (past {self.sizes.time_limit_s:.0f} s since the start)")
            self.findings.skipped.append(title)
            return
        print(f"\n== {title}")
        began = time.perf_counter()
        try:
            function()
        except Exception:  # noqa: BLE001 - one broken case must not lose the others' figures
            traceback.print_exc(file=sys.stdout)
            self.findings.crashed.append(title)
        finally:
            release(self.sizes.device)
        self.findings.cases += 1
        print(f"   ({time.perf_counter() - began:.1f} s)")

    # ----- requests -----

    def text_to_image(self, preset: str, side: int | None = None, hires: bool = False,
                      seed: int = 1) -> TextToImageRequest:
        side = side or self.sizes.side[preset]
        settings = HiresFix(upscale=self.sizes.hires[preset], upscaler="Latent", steps=self.sizes.hires_steps,
                            denoising_strength=0.5) if hires else None
        return TextToImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, preset=preset, scheduler=SCHEDULER,
                                  steps=self.sizes.steps, guidance_scale=7.0, seed=seed, width=side, height=side,
                                  hires=settings)

    def inpaint_request(self, preset: str) -> InpaintRequest:
        return InpaintRequest(prompt=PROMPT, negative_prompt=NEGATIVE, preset=preset, scheduler=SCHEDULER,
                              steps=self.sizes.steps, guidance_scale=7.0, seed=2, strength=1.0)

    def source_image(self, preset: str) -> Image.Image:
        side = self.sizes.side[preset]
        return self.images.get(preset) or Image.new("RGB", (side, side), (90, 120, 160))

    # ----- the engine's tasks -----

    def engine_cases(self) -> None:
        """Both families' tasks and the upscale, on one manager with the app's default budget."""
        engines = self.engines()
        probe = Probe(engines)
        self.family_cases(engines, probe, SD15)
        self.run_case(f"{SD15}: text to image with a ControlNet unit, {self.sizes.side[SD15]}²",
                      lambda: self.controlled(engines, probe, SD15, (CONTROLNET_SD15,)))
        self.run_case(f"{SD15}: text to image with TAESD live previews every {DEFAULT_PREVIEW_EVERY} step(s), "
                      f"{self.sizes.side[SD15]}², the image's time with them ÷ without",
                      lambda: self.taesd_previews(engines, probe, SD15))
        self.run_case("upscale ×4, RRDBNet of x4plus's size", lambda: self.upscale(engines, probe))
        self.family_cases(engines, probe, SDXL)
        self.run_case(f"{SDXL}: text to image with Union ProMax and the sketch T2I-Adapter, {self.sizes.side[SDXL]}²",
                      lambda: self.controlled(engines, probe, SDXL, (UNION_SDXL, ADAPTER_SDXL)))

    def family_cases(self, engines: Engines, probe: Probe, preset: str) -> None:
        self.run_case(f"{preset}: text to image, {self.sizes.side[preset]}², denoise speed vs a bare pipeline",
                      lambda: self.text_to_image_speed(engines, probe, preset))
        self.run_case(f"{preset}: inpaint, {self.sizes.side[preset]}², a square mask",
                      lambda: self.inpaint(engines, probe, preset))
        side = self.sizes.side[preset]
        self.run_case(f"{preset}: Hires. fix (Latent) {side}² → {int(side * self.sizes.hires[preset])}²",
                      lambda: self.hires(engines, probe, preset))

    def text_to_image_speed(self, engines: Engines, probe: Probe, preset: str) -> None:
        request = self.text_to_image(preset)
        studio = []
        for run in range(self.sizes.timed_runs + 1):  # the first warms up (kernels, cuDNN, the model hash)
            case = f"{preset} text to image" if run == 1 else f"{preset} text to image, run {run}"
            with probe.case(case):
                result, outcome = attempt(lambda: engines.text_to_image.generate(request))
            if run == 1 or outcome:
                self.report(probe, engines.manager, case, outcome)
            if outcome:
                return  # no image, no speed: what ended it is printed
            if run == 1:
                self.images[preset] = result.images[0].image.convert("RGB")
            if run > 0:
                studio.append(next(r for r in probe.of_case(case) if r.stage == "denoise").seconds)
        bare = self.bare_denoise_seconds(engines, probe, preset, request)
        studio_speed, bare_speed = request.steps / min(studio), request.steps / min(bare)
        ratio = studio_speed / bare_speed
        self.findings.speed[preset] = ratio
        verdict = "ok" if ratio >= SPEED_TARGET else f"BELOW the {SPEED_TARGET} target"
        print(f"   denoise speed: studio {studio_speed:.2f} it/s, bare diffusers pipeline {bare_speed:.2f} it/s, "
              f"ratio {ratio:.3f} ({verdict}; best of {len(studio)} runs each, {request.steps} steps)")

    def bare_denoise_seconds(self, engines: Engines, probe: Probe, preset_name: str,
                             request: TextToImageRequest) -> list[float]:
        """A bare diffusers pipeline on the modules the manager holds, with the studio's embeddings and scheduler:
        the seconds of its denoising loop, warm-up first."""
        preset = self.presets.get(preset_name)
        keys = engines.models.keys(preset, "text2img")
        parts = {role: engines.manager.loaded_object(key) for role, key in keys.items()}
        pipe = bare_pipeline(preset.family, parts)
        embeds = probe.conditioning.embeds
        seconds = []
        for run in range(self.sizes.timed_runs + 1):
            synchronize(self.sizes.device)
            began = time.perf_counter()  # the scheduler made inside the timing too, as the studio's stage makes it
            pipe.scheduler = make_scheduler(request.scheduler, parts["scheduler"].config, preset.scheduler_overrides,
                                            seed=request.seed)
            pipe(**embeds, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                 width=request.width, height=request.height, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(request.seed))
            synchronize(self.sizes.device)
            if run > 0:
                seconds.append(time.perf_counter() - began)
        return seconds

    def inpaint(self, engines: Engines, probe: Probe, preset: str) -> None:
        image = self.source_image(preset)
        side = image.width
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).rectangle((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=255)
        case = f"{preset} inpaint"
        with probe.case(case):
            _, outcome = attempt(lambda: engines.inpainter.inpaint(image, mask, self.inpaint_request(preset)))
        self.report(probe, engines.manager, case, outcome)

    def controlled(self, engines: Engines, probe: Probe, preset: str, models: tuple[str, ...]) -> None:
        """Text to image with a unit per model, a drawn square as the map: the denoise stage leases them beside
        the UNet with 10% more working memory per unit, which `reserved` vs `used` checks."""
        side = self.sizes.side[preset]
        drawing = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(drawing).rectangle((side // 4, side // 4, 3 * side // 4, 3 * side // 4), outline="black",
                                          width=max(2, side // 64))
        units = tuple(ControlUnit(model, drawing, "scribble", processor_res=side) for model in models)
        case = f"{preset} + {' + '.join(models)}"
        with probe.case(case):
            request = dataclasses.replace(self.text_to_image(preset), controls=units)
            _, outcome = attempt(lambda: engines.text_to_image.generate(request))
        self.report(probe, engines.manager, case, outcome)

    def taesd_previews(self, engines: Engines, probe: Probe, preset: str) -> None:
        """A watched job (LocalJob with a preview callback, as the page's): its TAESD leased beside the UNet (the
        denoise stage's `reserved` vs `used` with it), and the image's time with previews at the default interval
        ÷ without (target <= 1.03, issue [4/7]), best of the timed runs, alternating."""
        engine = engines.text_to_image
        request = self.text_to_image(preset)
        shown: list[Image.Image] = []

        def seconds(watched: bool) -> float:
            job = LocalJob(on_preview=lambda image, part: shown.append(image)) if watched else LocalJob()
            with engine.model_files(engine.plan(request)) as plan:
                synchronize(self.sizes.device)
                began = time.perf_counter()
                engine.run(plan, job)
                synchronize(self.sizes.device)
                return time.perf_counter() - began

        case = f"{preset} TAESD previews"
        with probe.case(case):
            _, outcome = attempt(lambda: seconds(True))  # the first warms up (the decoder loaded, its kernels)
        self.report(probe, engines.manager, case, outcome)
        if outcome:
            return
        decoded = shown[-1].size == (request.width, request.height)  # Fast previews would be a pixel per latent
        shown.clear()
        without, with_previews = [], []
        for _ in range(self.sizes.timed_runs):
            without.append(seconds(False))
            with_previews.append(seconds(True))
        previews = len(shown) // self.sizes.timed_runs
        ratio = min(with_previews) / min(without)
        verdict = "ok" if ratio <= PREVIEW_COST_TARGET else f"ABOVE the {PREVIEW_COST_TARGET} target"
        self.findings.preview_ratio = ratio
        print(f"   TAESD previews: {previews} per image of {request.steps} steps, "
              f"{'decoded at the image size' if decoded else 'NOT decoded by TAESD'}; image {min(without):.3f} s "
              f"without, {min(with_previews):.3f} s with: ratio {ratio:.3f} ({verdict}; best of "
              f"{self.sizes.timed_runs}); {(min(with_previews) - min(without)) / max(previews, 1) * 1000:.2f} ms "
              "per preview")

    def hires(self, engines: Engines, probe: Probe, preset: str) -> None:
        case = f"{preset} Hires. fix"
        with probe.case(case):
            _, outcome = attempt(lambda: engines.text_to_image.generate(self.text_to_image(preset, hires=True)))
        self.report(probe, engines.manager, case, outcome)

    def upscale(self, engines: Engines, probe: Probe) -> None:
        image = self.source_image(SD15)
        case = "x4plus upscale"
        with probe.case(case):
            _, outcome = attempt(lambda: engines.upscaling.upscale(image, UpscaleRequest(UPSCALER_NAME, scale=4.0)))
        self.report(probe, engines.manager, case, outcome)

    # ----- SD 3.5 Large and FLUX.1-dev: as planned, float8 storage, block streaming -----

    def flow_cases(self, preset: str) -> None:
        """One flow model at its size: the image as planned on the big GPU, then on fresh managers under a budget
        that leaves its denoise stage float8 storage, and one that leaves it block streaming."""
        model, side, steps = self.sizes.flow[preset], self.sizes.flow_side, self.sizes.flow_steps
        dtype = dtype_name(family_named(model.family).compute_dtype(self.sizes.dtype))
        if self.sizes.cuda:
            limits = {STORED: f"a {format_bytes(model.float8_budget)} budget",
                      STREAMED: f"a {format_bytes(model.streaming_budget)} budget"}
        else:
            limits = dict.fromkeys((STORED, STREAMED), "leases limited in weights (the smoke run's small GPU)")
        self.run_case(f"{preset} ({model.label}): text to image {side}², {steps} steps, {dtype}, as planned on the "
                      f"{'GPU' if self.sizes.cuda else 'CPU'}; twice (the second: the plain denoise time)",
                      lambda: self.flow_as_planned(preset))
        self.run_case(f"{preset}: the same image under {limits[STORED]}: the transformer stored in float8; the image "
                      "against the plain one", lambda: self.flow_limited(preset, STORED))
        self.run_case(f"{preset}: the same image under {limits[STREAMED]}: the transformer's blocks streamed from RAM; "
                      "the denoise stage's peak against its reservation, its time against the plain one",
                      lambda: self.flow_limited(preset, STREAMED))

    def flow_request(self, preset: str) -> TextToImageRequest:
        model, side = self.sizes.flow[preset], self.sizes.flow_side
        return TextToImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, preset=preset, scheduler=FLOW_SCHEDULER,
                                  steps=self.sizes.flow_steps, guidance_scale=model.guidance, seed=1, width=side,
                                  height=side, live_preview=OFF)

    def flow_as_planned(self, preset: str) -> None:
        engines = self.engines(flow=True)
        probe = Probe(engines)
        request = self.flow_request(preset)
        images = []
        for run in (1, 2):  # the second on the models the first loaded: its denoise time is the plain one
            case = f"{preset} as planned" + (", again" if run == 2 else "")
            with probe.case(case):
                result, outcome = attempt(lambda: engines.text_to_image.generate(request))
            self.report(probe, engines.manager, case, outcome)
            self.report_made()
            denoise = denoise_record(probe, case)
            if run == 1:
                self.expect(case, denoise, PLAIN)
            if outcome:
                return
            images.append(pixels(result))
        self.flow_plain[preset] = (images[0], denoise.seconds)
        mean, most = levels_apart(images[1], images[0])
        again = "identical" if most == 0 else f"{mean:.3f} levels apart on average, {most:.0f} at most"
        print(f"   as planned: denoise {denoise.seconds:.2f} s for {request.steps} steps "
              f"({request.steps / denoise.seconds:.2f} it/s) on the loaded models; the same image again: {again}")

    def flow_limited(self, preset: str, placement: str) -> None:
        """A fresh manager under the model's budget for `placement` (float8 storage, block streaming); on the CPU,
        leases limited in weights instead (limit_weights), at sizes of the tiny models' that leave the same
        placements (smoke_weights_budgets)."""
        model = self.sizes.flow[preset]
        if self.sizes.cuda:
            engines = self.engines(model.float8_budget if placement == STORED else model.streaming_budget, flow=True)
        else:
            engines = self.engines(flow=True)
            weights = self.smoke_weights_budgets(preset)[placement]
            limit_weights(engines.manager, weights)
            print(f"   (the smoke run's small GPU: a lease whose models take over {format_bytes(weights)} is refused)")
        probe = Probe(engines)  # after limit_weights: it sees every try
        case = f"{preset} {placement}"
        with probe.case(case):
            result, outcome = attempt(lambda: engines.text_to_image.generate(self.flow_request(preset)))
        self.report(probe, engines.manager, case, outcome)
        self.report_made()
        denoise = denoise_record(probe, case)
        self.expect(case, denoise, placement)
        if outcome or preset not in self.flow_plain:
            return
        plain_image, plain_seconds = self.flow_plain[preset]
        mean, most = levels_apart(pixels(result), plain_image)
        name = preset.split("-")[0]
        if placement == STORED:
            self.findings.float8_difference[name] = (mean, most)
            verdict = "within" if mean <= FLOAT8_MEAN_LEVELS else "ABOVE"
            print(f"   float8 storage: the image against the plain one: {mean:.2f} levels (of 255) apart on average, "
                  f"{most:.0f} at most ({verdict} the tolerance of {FLOAT8_MEAN_LEVELS} on average)")
            return
        ratio = denoise.seconds / plain_seconds
        self.findings.streaming_ratio[name] = ratio
        if denoise.used is not None:
            memory = (f"used {format_bytes(denoise.used)} of the {format_bytes(denoise.reserved)} reserved"
                      + (" (OVER)" if denoise.used > denoise.reserved else ""))
        else:
            memory = f"{format_bytes(denoise.reserved)} reserved (memory figures: CUDA only)"
        encode = next((record for record in probe.of_case(case) if record.stage == "encode"), None)
        stored = f", encoded with {', '.join(encode.stored)} in float8" if encode is not None and encode.stored else ""
        print(f"   block streaming: denoise {memory}; {denoise.seconds:.2f} s "
              f"({denoise.seconds - denoise.work_seconds:.2f} s of it setting the streams up and taking them off) vs "
              f"{plain_seconds:.2f} s as planned: time ratio {ratio:.2f}; the image against the plain one: "
              f"{mean:.2f} levels apart on average, {most:.0f} at most (float8 storage too{stored})")

    def smoke_weights_budgets(self, preset: str) -> dict[str, int]:
        """The smoke run's weights budgets, from the tiny models' sizes as the manager counts them: for float8
        storage (as FLUX.1-dev at 16 GiB) the text encoders and the VAE fit as they are, the transformer only in
        float8; for block streaming (at 8 GiB) T5 only in float8, the transformer not even so."""
        found = self.presets.get(preset)
        family, keys = family_of(found), DiffusersModels(self.sizes.device).keys(found, "text2img")
        dtype = family.compute_dtype(self.sizes.dtype)

        def size(role: str, stored: bool = False) -> int:
            return self.random_weights.size(keys[role], FLOAT8 if stored else dtype)

        encoders = sum(size(role) for role in family.text_encoders)
        encoders_stored = sum(size(role, role == family.t5) for role in family.text_encoders)
        transformer, transformer_stored, vae = size(family.denoiser), size(family.denoiser, True), size(family.vae)
        windows = {STORED: (max(encoders, vae, transformer_stored), transformer),
                   STREAMED: (max(encoders_stored, vae), min(encoders, transformer_stored))}
        for placement, (low, high) in windows.items():
            if low >= high:
                raise AssertionError(f"{preset}: the tiny models' sizes leave no weights budget for {placement} "
                                     f"({low:,} >= {high:,} bytes): change them in tiny_sizes()")
        return {placement: (low + high) // 2 for placement, (low, high) in windows.items()}

    def expect(self, case: str, denoise: StageRecord | None, expected: str) -> None:
        """Whether the case's denoise stage ran with the placement it was made for (the last fallback it took)."""
        ran = "no denoise stage" if denoise is None else (denoise.fallbacks[-1] if denoise.fallbacks else PLAIN)
        reached = denoise is not None and not denoise.failed and ran == expected
        self.findings.placements.append((case, expected, ran, reached))
        how = "no denoise stage" if denoise is None else denoise.how + (" (failed)" if denoise.failed else "")
        print(f"   placement: the denoise stage ran {how}: "
              + ("as expected" if reached else f"NOT {expected} as expected"))

    def report_made(self) -> None:
        """What RandomWeights made for the case's loads (each load makes its model anew)."""
        made = self.random_weights.made
        if made:
            print("     random weights made for its loads: " + ", ".join(f"{name} {seconds:.1f} s"
                                                                        for name, seconds, _ in made)
                  + ("" if all(finite for *_, finite in made) else
                     "; NOT FINITE: " + ", ".join(name for name, _, finite in made if not finite)))
        made.clear()

    # ----- model CPU offload and memory limits -----

    def too_small_for_the_unet(self) -> None:
        """A: SD 1.5 text to image, text encoders pinned, a budget that holds them and the encode stage but not the
        UNet with its working memory."""
        preset, side = self.presets.get(SD15), self.sizes.side[SD15]
        sizing = self.engines()  # loads nothing: sizes come from the files' headers, working memory from the plan
        pinned = self.model_bytes(sizing, preset, "text2img", *family_of(preset).text_encoders)
        unet = self.model_bytes(sizing, preset, "text2img", "unet")
        working = sizing.stages.plan_denoise(preset, "text2img", side, side, guidance=True).working_memory
        budget = pinned + unet + working - unet // 4
        engines = self.engines(budget)
        probe = Probe(engines)
        self.pin(engines, preset, family_of(preset).text_encoders)
        self.limited_run(engines, probe, f"A: budget {format_bytes(budget)} (text encoders {format_bytes(pinned)} "
                         f"pinned, UNet {format_bytes(unet)}, denoise working memory {format_bytes(working)})",
                         lambda: engines.text_to_image.generate(self.text_to_image(SD15)))

    def offload_for_unet_and_vae(self) -> None:
        """B: SD 1.5 inpaint, text encoders pinned, a budget that holds the UNet and the denoise stage's working
        memory but not the VAE besides: model CPU offload is the way left."""
        preset, side = self.presets.get(SD15), self.sizes.side[SD15]
        sizing = self.engines()
        pinned = self.model_bytes(sizing, preset, "inpaint", *family_of(preset).text_encoders)
        unet = self.model_bytes(sizing, preset, "inpaint", "unet")
        vae = self.model_bytes(sizing, preset, "inpaint", "vae")
        working = sizing.stages.plan_denoise(preset, "inpaint", side, side, True, tiled=True).working_memory
        budget = pinned + unet + working + vae // 2
        engines = self.engines(budget)
        probe = Probe(engines)
        self.pin(engines, preset, family_of(preset).text_encoders)
        image = self.source_image(SD15)
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=255)
        self.limited_run(engines, probe, f"B: budget {format_bytes(budget)} (text encoders {format_bytes(pinned)} "
                         f"pinned, UNet {format_bytes(unet)}, VAE {format_bytes(vae)}, tiled working memory "
                         f"{format_bytes(working)})",
                         lambda: engines.inpainter.inpaint(image, mask, self.inpaint_request(SD15)))

    def pinned_and_capped(self) -> None:
        """C: every SD 1.5 model pinned; the allocator capped just above the weights, so that real CUDA
        out-of-memory errors (not the manager's budget) walk the fallbacks, with pinned models in the stage."""
        engines = self.engines()
        probe = Probe(engines)
        preset = self.presets.get(SD15)
        self.pin(engines, preset, tuple(engines.models.keys(preset, "text2img")))
        release(self.sizes.device)
        cap = torch.cuda.memory_reserved() + 64 * MIB
        total = torch.cuda.get_device_properties(self.sizes.device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            self.limited_run(engines, probe, f"C: every model pinned, allocator capped at {format_bytes(cap)} "
                             "(64 MiB above the weights), 1024²",
                             lambda: engines.text_to_image.generate(self.text_to_image(SD15, side=1024)))
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        self.limited_run(engines, probe, f"C, then: a {self.sizes.side[SD15]}² image, no cap",
                         lambda: engines.text_to_image.generate(self.text_to_image(SD15)))

    def sdxl_under_8_gib(self) -> None:
        """D: SDXL 1024² on a fresh manager with an 8 GiB budget; on CUDA the allocator is capped at 8 GiB too, so
        that what the manager plans is what the device allows."""
        engines = self.engines(8 * GIB)
        probe = Probe(engines)
        total = torch.cuda.get_device_properties(self.sizes.device).total_memory if self.sizes.cuda else 0
        if self.sizes.cuda:
            torch.cuda.set_per_process_memory_fraction(min(1.0, 8 * GIB / total))
        try:
            self.limited_run(engines, probe, "D: budget 8 GiB" + (", allocator capped at 8 GiB" if total else ""),
                             lambda: engines.text_to_image.generate(self.text_to_image(SDXL)))
        finally:
            if self.sizes.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        if self.sizes.cuda:
            print(f"   peak: torch {format_bytes(probe.case_peak)} allocated (8 GiB = {format_bytes(8 * GIB)}); "
                  f"the manager's books {format_bytes(engines.manager.status().peak)}")

    def limited_run(self, engines: Engines, probe: Probe, case: str, generate: Callable[[], object]) -> None:
        with probe.case(case):
            _, outcome = attempt(generate)
        self.report(probe, engines.manager, case, outcome)

    @staticmethod
    def pin(engines: Engines, preset, roles: tuple[str, ...]) -> None:
        """Preloads the preset's `roles` on the device and pins them there, as ZeroGPU does."""
        keys = {role: key for role, key in engines.models.keys(preset, "text2img").items() if role in roles}
        engines.manager.preload(keys, pin=True)

    @staticmethod
    def model_bytes(engines: Engines, preset, task: str, *roles: str) -> int:
        """The bytes the manager will count for the preset's `roles`, known before loading."""
        keys = [engines.models.keys(preset, task)[role] for role in roles]
        return sum(engines.manager.loaders[key.kind].size(key, engines.manager.dtype) for key in keys)

    # ----- printing -----

    def report(self, probe: Probe, manager: ModelManager, case: str, outcome: str = "") -> None:
        """The case's stages, what ended it, and the manager's records against the device."""
        records = probe.of_case(case)
        print(f"   {case}: {outcome or 'finished'}")
        self.findings.unexpected += outcome.startswith("UNEXPECTED")
        for record in records:
            print("     " + stage_line(record, self.sizes.cuda))
            self.findings.stages += 1
            self.findings.nan_stages += bool(record.nan)
            self.findings.over_reserved += record.used is not None and record.used > record.reserved
        status = manager.status()
        if self.sizes.cuda:
            allocated = torch.cuda.memory_allocated()
            print(f"     after: the manager records {format_bytes(status.device_used)} on {status.device}, torch has "
                  f"{format_bytes(allocated)} allocated ({format_bytes(allocated - status.device_used)} besides); "
                  f"case peak {format_bytes(probe.case_peak)} allocated, the manager's peak "
                  f"{format_bytes(status.peak)}")
        checked, problems = placement_problems(manager)
        self.findings.mismatches += len(problems)
        if problems:
            print(f"     placement: {len(problems)} MISMATCH(ES) in {checked} records: " + "; ".join(problems))
        else:
            print(f"     placement: all {checked} records match where the models' tensors are")

    def summary(self) -> str:
        found = self.findings
        speed = ", ".join(f"{name.split('-')[0]} {ratio:.3f}" for name, ratio in found.speed.items()) or "none"
        float8 = ", ".join(f"{name} {mean:.2f} (max {most:.0f})"
                           for name, (mean, most) in found.float8_difference.items()) or "none"
        streaming = ", ".join(f"{name} {ratio:.2f}" for name, ratio in found.streaming_ratio.items()) or "none"
        reached = sum(1 for *_, ok in found.placements if ok)
        return (f"gpu check: {found.cases} cases, {found.stages} stages, NaN in {found.nan_stages}, over reserved "
                f"{found.over_reserved}, placement mismatches {found.mismatches}, unexpected errors "
                f"{found.unexpected}, denoise speed ratio {speed}, TAESD preview cost ratio "
                f"{'none' if found.preview_ratio is None else f'{found.preview_ratio:.3f}'}, float8 image "
                f"difference {float8}, block streaming time ratio {streaming}, flow placements as expected "
                f"{reached}/{len(found.placements)} ({time.perf_counter() - STARTED:.0f} s)")

    # ----- the run -----

    def run(self) -> None:
        if self.sd:
            self.engine_cases()
            release(self.sizes.device)  # the engines of those cases are gone: the next start with an empty device
        for preset in self.sizes.flow:
            self.flow_cases(preset)
            release(self.sizes.device)
        if not self.sd:
            return
        self.run_case(f"SDXL {self.sizes.side[SDXL]}² under an 8 GiB budget", self.sdxl_under_8_gib)
        if not self.sizes.cuda:
            print("\n(on the CPU model CPU offload is not among the fallbacks, and with tiny models the encode stage's "
                  "estimate is larger than the budgets made for the UNet: A and B end at the encode stage here)")
        self.run_case("model CPU offload A: budget too small for the UNet, text encoders pinned",
                      self.too_small_for_the_unet)
        self.run_case("model CPU offload B: room for the UNet, not the UNet and the VAE, text encoders pinned",
                      self.offload_for_unet_and_vae)
        if self.sizes.cuda:
            self.run_case("model CPU offload C: every model pinned, real out-of-memory errors", self.pinned_and_capped)
        else:
            print("\n== model CPU offload C: skipped on the CPU (it caps CUDA's allocator)")


def bare_pipeline(family: str, parts: dict):
    """A plain diffusers pipeline over the given module objects (no safety checker, no watermark)."""
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                         tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
                                         scheduler=parts["scheduler"], add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                       tokenizer=parts["tokenizer"], unet=parts["unet"], scheduler=parts["scheduler"],
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def limit_weights(manager: ModelManager, budget: int) -> None:
    """The smoke run's small GPU. On the CPU the manager has one tier and reserves a stage's working memory as
    estimated, T5's 96 MiB per prompt and byte of dtype among them, which dwarfs tiny models: no device budget lets
    the text encoders fit and not the transformer. So, as tests/test_flow_memory.py does, a lease is refused here
    (OutOfMemoryBudget, as the manager refuses) when the models it would place on the device, as their loader sizes
    them (in float8 where the lease stores them; those streamed from RAM not counted), take over `budget` bytes;
    the stages' own fallbacks answer it, as they answer a GPU's budget. Install it before the Probe."""
    real_use = manager.use

    def use(keys, working_memory=0, on_device=True, patches=None, dtypes=None, storage=None, in_ram=frozenset()):
        if on_device:
            placed = {key: (storage or {}).get(role) or manager.dtype_of(key)
                      for role, key in keys.items() if role not in in_ram}
            weights = sum(manager.loaders[key.kind].size(key, dtype) for key, dtype in placed.items())
            if weights > budget:
                raise OutOfMemoryBudget(f"Not enough device memory: this lease's models take {format_bytes(weights)}, "
                                        f"the smoke run's small GPU {format_bytes(budget)}.")
        return real_use(keys, working_memory, on_device, patches, dtypes, storage, in_ram)

    manager.use = use


def denoise_record(probe: Probe, case: str) -> StageRecord | None:
    return next((record for record in probe.of_case(case) if record.stage == "denoise"), None)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)


def levels_apart(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean, max) of |image - reference| in levels of 255."""
    difference = np.abs(image - reference)
    return float(difference.mean()), float(difference.max())


def attempt(task: Callable[[], object]) -> tuple[object | None, str]:
    """Runs a task: (its result, ""), or (None, how it ended): the studio's own errors (OutOfMemoryBudget,
    NumericalError: what a user would see), or any other error, which is the engine's bug (UNEXPECTED)."""
    try:
        return task(), ""
    except (OutOfMemoryBudget, NumericalError) as error:
        return None, f"ENDED by {type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001 - reported as a finding: its traceback, and where the studio was
        traceback.print_exc(file=sys.stdout)
        frames = traceback.extract_tb(error.__traceback__)
        studio = [frame for frame in frames if f"{os.sep}studio{os.sep}" in frame.filename] or frames
        return None, (f"UNEXPECTED {type(error).__name__} in {Path(studio[-1].filename).name}:{studio[-1].lineno} "
                      f"(raised at {Path(frames[-1].filename).name}:{frames[-1].lineno}): "
                      f"{str(error).splitlines()[0] if str(error) else ''}")


def stage_line(record: StageRecord, cuda: bool) -> str:
    nan = "-" if record.nan is None else ("YES" if record.nan else "no")
    how = record.how + (f" ({record.tiles} tiles)" if record.tiles > 1 else "")
    if record.failed:
        how += f", FAILED ({record.failed.split(':')[0]})"
    if record.stored:
        how += f" [float8: {', '.join(record.stored)}]"
    line = f"{record.stage:<13} {how:<24} reserved {format_bytes(record.reserved):>9}"
    if cuda and record.used is not None:
        verdict = "" if record.used <= record.reserved else " OVER"
        line += (f", used {format_bytes(record.used):>9}{verdict}; manager {format_bytes(record.manager_bytes):>9} "
                 f"vs allocated {format_bytes(record.allocated):>9}")
    elif not cuda:
        line += f"; manager {format_bytes(record.manager_bytes):>9} (memory figures: CUDA only)"
    return f"{line}; NaN {nan}; {record.seconds:.2f} s"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def versions(sizes: Sizes) -> str:
    found = []
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "compel", "pillow", "numpy"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    device = "CPU"
    if sizes.cuda:
        properties = torch.cuda.get_device_properties(0)
        device = f"{properties.name}, {format_bytes(properties.total_memory)}, CUDA {torch.version.cuda}"
    return f"Python {sys.version.split()[0]}; {', '.join(found)}; {device}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU with tiny models, in seconds (the test suite)")
    parser.add_argument("--only-flow", action="store_true",
                        help="only the SD 3.5 Large and FLUX.1-dev cases (no SD 1.5, SDXL, upscaler or control models)")
    parser.add_argument("--wheels", default=str(DEFAULT_WHEELS),
                        help="a folder of wheels for what is not installed (default bench/wheels)")
    parser.add_argument("--only-gpu-machine-packages", action="store_true",
                        help="the closure check: run with only the GPU machine's packages and the wheels folder")
    arguments = parser.parse_args()
    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    sys.stdout.reconfigure(line_buffering=True)  # in order with the log, through a pipe too
    logging.basicConfig(level=logging.WARNING, format="   log: %(name)s: %(message)s", stream=sys.stdout)
    sizes = tiny_sizes() if arguments.smoke else real_sizes()
    if not arguments.smoke and not torch.cuda.is_available():
        print("No CUDA GPU here: run with --smoke on a CPU.", file=sys.stderr)
        return 2
    print(versions(sizes))
    if WHEELS_ADDED:
        print(f"from the wheels folder {arguments.wheels}: {', '.join(WHEELS_ADDED)}")
    print(f"upscaler architecture: {rrdbnet_in_use()}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        began = time.perf_counter()
        write_models(Path(folder), sizes, sd=not arguments.only_flow)
        print(f"  ({time.perf_counter() - began:.1f} s)")
        check = Check(sizes, Path(folder), sd=not arguments.only_flow)
        check.run()
        print(f"\nwheels imported from: {', '.join(wheels_imported()) or 'none (everything is installed)'}")
        print(check.summary())
        for name in check.findings.skipped:
            print(f"SKIPPED (time): {name}")
        for name in check.findings.crashed:
            print(f"CRASHED: {name}")
        return 1 if check.findings.crashed else 0


def wheels_imported() -> list[str]:
    """The wheels (zips on sys.path, or unpacked) that modules were really imported from."""
    places = [entry for entry in sys.path if entry.endswith(".whl") or "gpu_check_wheels" in entry]
    used = {place for module in list(sys.modules.values()) for place in places
            if (getattr(module, "__file__", None) or "").startswith(place)}
    return sorted(Path(place).name for place in used)


if __name__ == "__main__":
    sys.exit(main())

"""Resident memory of three warm tasks on one shared model manager, against three separate diffusers pipelines.

The model is Stable Diffusion 1.5's architecture with random weights (real configs, asserted parameter counts:
UNet 859,520,964, CLIP text encoder 123,060,480, VAE 83,653,863), saved once as a diffusers folder of fp16
safetensors under /tmp and reused by later runs (the cache is keyed by VERSION). Then each case runs in a fresh
subprocess of its own, so that one case's memory cannot pollute the other's, and reads the process's resident
set size (VmRSS in /proc/self/status, after gc.collect()) before and after making three tasks warm, in float32
on the CPU (the studio's CPU dtype; loading the fp16 files copies them, as loading onto a GPU does), at 64x64 px
and 1 denoising step (tiny inputs: the weights, not the activations, dominate):

  (a) shared:   the studio's one ModelManager (studio.tasks.engines.local_engines) running Text to image, Inpaint (on the base
                UNet, as for a preset without an inpainting checkpoint) and Sketch to image (img2img) once each;
  (b) separate: StableDiffusionPipeline, StableDiffusionInpaintPipeline and StableDiffusionImg2ImgPipeline, each
                from_pretrained of the same folder, all three kept alive, each run once.

It prints each RSS delta with its anonymous and file-backed parts and Pss, ratio = shared / separate by RSS and
by Pss (the larger is judged; target <= 0.40), and the manager's own accounting of the bytes it holds as a
cross-check, and exits 1 when the target is not met. (Weights loaded in their files' own dtype would stay
memory-mapped, and three mappings of one file count three times in RSS but take RAM once: Pss shows that.)

    python bench/shared_memory.py            # a few minutes on 2 cores
    python bench/shared_memory.py --rebuild  # build the folder again
    python bench/shared_memory.py --smoke    # the same code on SD 1.5's layout at tiny widths (its own cached
                                             # folder; figures meaningless, target not judged; the tests run it)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VERSION = "sd15-random-fp16-v1"  # bump when the folder's contents change
CACHE_DIR = Path(tempfile.gettempdir()) / f"studio-bench-{VERSION}"
TINY_VERSION = "sd15-tiny-fp16-v1"  # --smoke's folder: the same layout at tiny widths
TINY_CACHE_DIR = Path(tempfile.gettempdir()) / f"studio-bench-{TINY_VERSION}"
DONE_MARK = ".complete"
TOKENIZER_SOURCE = ROOT / "models" / "embedded-sd" / "tokenizer"
GIB = 1024**3
TARGET = 0.40
SIZE = 64
PROMPT = "a red circle on a blue background"
GUIDANCE = 7.0
SEED = 1
PRESET_NAME = "sd15-random"
RESULT_PREFIX = "RESULT "

EXPECTED_PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}

# --smoke: SD 1.5's component classes and layout with the widths of diffusers' own test models (seconds to build
# and load). Two VAE blocks downsample by 2, so a 64 px image has 32 px latents.
TINY = {
    "unet": dict(sample_size=32, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "vae": dict(layers_per_block=1, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2),
}


# ----- SD1.5's configs -----


def unet_config() -> dict:
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    )


def text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32,
    )


def scheduler_config() -> dict:
    """SD1.5's own scheduler_config.json (PNDM; clip_sample is a key diffusers ignores for PNDM)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        prediction_type="epsilon", timestep_spacing="leading",
    )


# ----- the random-weight folder -----


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_param_counts(modules: dict) -> None:
    for role, expected in EXPECTED_PARAMS.items():
        got = count_params(modules[role])
        assert got == expected, f"{role}: {got:,} parameters, SD1.5 has {expected:,}"


def build_tokenizer():
    """The embedded model's character-level CLIP tokenizer, made to pad and truncate to 77 tokens."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_SOURCE), model_max_length=77)
    assert tokenizer.model_max_length == 77
    return tokenizer


def build_random_modules(tiny: bool = False) -> dict:
    """UNet, text encoder and VAE with SD1.5's configs (or TINY's widths) and random weights, cast to float16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(float16)
    widths = TINY if tiny else {"unet": {}, "text_encoder": {}, "vae": {}}
    text_config = text_encoder_config()
    text_config.update(widths["text_encoder"])
    torch.manual_seed(0)
    modules = {
        "unet": UNet2DConditionModel(**(unet_config() | widths["unet"])),
        "text_encoder": CLIPTextModel(text_config),
        "vae": AutoencoderKL(**(vae_config() | widths["vae"])),
    }
    if not tiny:
        check_param_counts(modules)
    return {role: module.to(torch.float16).eval() for role, module in modules.items()}


def save_folder(folder: Path, tiny: bool = False) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **build_random_modules(tiny), tokenizer=build_tokenizer(),
        scheduler=PNDMScheduler.from_config(scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True, variant=None)


def check_folder(folder: Path) -> None:
    """The saved tokenizer really pads to 77 tokens, and its ids fit the text encoder's vocabulary."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    ids = tokenizer(PROMPT, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert tokenizer.model_max_length == 77 and ids.shape == (1, 77), (tokenizer.model_max_length, ids.shape)
    assert int(ids.max()) < text_encoder_config().vocab_size


def ensure_folder(rebuild: bool = False, tiny: bool = False) -> tuple[Path, float]:
    """The cached folder (built now if missing) and the seconds spent building it (0 when reused); `tiny`: the
    smoke run's folder, TINY's widths."""
    cache_dir, version = (TINY_CACHE_DIR, TINY_VERSION) if tiny else (CACHE_DIR, VERSION)
    if rebuild and cache_dir.exists():
        shutil.rmtree(cache_dir)
    if (cache_dir / DONE_MARK).exists():
        return cache_dir, 0.0
    began = time.perf_counter()
    partial = Path(tempfile.mkdtemp(prefix=f"{cache_dir.name}.partial-", dir=cache_dir.parent))
    try:
        save_folder(partial, tiny)
        check_folder(partial)
        (partial / DONE_MARK).write_text(version + "\n")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)  # an incomplete earlier attempt
        partial.rename(cache_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    gc.collect()
    return cache_dir, time.perf_counter() - began


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


# ----- measuring -----


def memory_now() -> dict[str, int]:
    """This process's resident memory in bytes (after a collection): VmRSS and its anonymous/file-backed parts
    from /proc/self/status, and Pss from /proc/self/smaps_rollup (shared pages divided among their mappers)."""
    gc.collect()
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    fields["Pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return fields


def memory_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if name in before}


def test_images():
    """A 64 px picture, a box mask (white = repaint) and a sketch: a red square drawn on transparent paper."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (40, 80, 200))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    sketch = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(sketch).rectangle((20, 20, 43, 43), fill=(200, 20, 20, 255))
    return image, mask, sketch


def import_everything() -> None:
    """Both cases import the same modules before their first reading, so imports never count in a delta."""
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import app  # noqa: F401
    import studio.tasks.generation  # noqa: F401, E401
    import studio.tasks.inpainting


def bench_preset(folder: Path):
    from studio.models.presets import load_presets

    return dataclasses.replace(
        load_presets().get("embedded"), name=PRESET_NAME, label="SD1.5 architecture, random weights",
        local=folder, inpaint_local=None, default_width=SIZE, default_height=SIZE, min_size=SIZE, max_size=SIZE,
    )


def timed(seconds: dict, name: str, fn):
    began = time.perf_counter()
    result = fn()
    seconds[name] = round(time.perf_counter() - began, 2)
    return result


def case_shared(folder: Path, dtype_name: str) -> dict:
    """(a) One manager, three tasks warm, through the studio's engines."""
    import torch

    from studio.core.devices import module_bytes
    from studio.models.presets import PresetCatalog
    from studio.tasks.engines import local_engines
    from studio.tasks.generation import TextToImageRequest
    from studio.tasks.inpainting import InpaintRequest

    dtype = getattr(torch, dtype_name)
    preset = bench_preset(folder)
    catalog = PresetCatalog([preset], default=PRESET_NAME)
    engines = local_engines(catalog, "cpu", device_budget=24 * GIB, dtype=dtype)
    text_to_image, inpainter = engines.text_to_image, engines.inpainter
    image, mask, sketch = test_images()
    common = dict(prompt=PROMPT, preset=PRESET_NAME, scheduler="Euler", steps=1, guidance_scale=GUIDANCE, seed=SEED)
    before = memory_now()
    seconds: dict[str, float] = {}
    results = [
        timed(seconds, "text2img", lambda: text_to_image.generate(TextToImageRequest(**common, width=SIZE, height=SIZE))),
        timed(seconds, "inpaint", lambda: inpainter.inpaint(image, mask, InpaintRequest(**common, strength=1.0))),
        timed(seconds, "sketch2img", lambda: inpainter.sketch_to_image(sketch, InpaintRequest(**common, strength=1.0))),
    ]
    after = memory_now()
    assert all(len(result.images) == 1 for result in results), [r.warnings for r in results]

    manager, models = text_to_image.manager, text_to_image.models
    keys = {key for task in ("text2img", "inpaint", "img2img") for key in models.keys(preset, task).values()}
    loaded = {key: manager.loaded_object(key) for key in keys}
    live = {id(obj): obj for obj in loaded.values() if isinstance(obj, torch.nn.Module)}
    return {
        "delta": memory_delta(before, after), "before": before, "after": after, "seconds": seconds,
        "manager_bytes": manager.status().device_used, "module_bytes": sum(module_bytes(m) for m in live.values()),
        "loads": manager.loads, "distinct_keys": len(keys), "all_loaded": all(v is not None for v in loaded.values()),
        "unets": len({id(loaded[k]) for k in keys if k.part == "unet"}),
    }


def case_separate(folder: Path, dtype_name: str) -> dict:
    """(b) The usual way: three pipelines from_pretrained of the same folder, all kept alive, each run once."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from studio.core.devices import module_bytes

    dtype = getattr(torch, dtype_name)
    image, mask, sketch = test_images()
    white = sketch_over_white(sketch)

    def generator():
        return torch.Generator("cpu").manual_seed(SEED)

    common = dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=GUIDANCE, output_type="pil")
    before = memory_now()
    seconds: dict[str, float] = {}
    pipes = {}
    for name, cls in (("text2img", StableDiffusionPipeline), ("inpaint", StableDiffusionInpaintPipeline),
                      ("img2img", StableDiffusionImg2ImgPipeline)):
        pipes[name] = timed(seconds, f"load {name}", lambda cls=cls: cls.from_pretrained(str(folder), dtype=dtype))
        pipes[name].set_progress_bar_config(disable=True)
    outputs = [
        timed(seconds, "text2img", lambda: pipes["text2img"](**common, width=SIZE, height=SIZE,
                                                             generator=generator()).images),
        timed(seconds, "inpaint", lambda: pipes["inpaint"](**common, image=image, mask_image=mask, width=SIZE,
                                                           height=SIZE, strength=1.0, generator=generator()).images),
        timed(seconds, "sketch2img", lambda: pipes["img2img"](**common, image=white, strength=1.0,
                                                              generator=generator()).images),
    ]
    after = memory_now()
    assert all(len(images) == 1 and images[0].size == (SIZE, SIZE) for images in outputs)
    modules = [m for pipe in pipes.values() for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return {
        "delta": memory_delta(before, after), "before": before, "after": after, "seconds": seconds,
        "module_bytes": sum(module_bytes(m) for m in modules), "distinct_modules": len({id(m) for m in modules}),
    }


def sketch_over_white(sketch):
    """The sketch as the studio prepares it: transparent paper is white."""
    from PIL import Image

    white = Image.new("RGB", sketch.size, "white")
    white.paste(sketch, mask=sketch.getchannel("A"))
    return white


CASES = {"shared": case_shared, "separate": case_separate}


def run_case(name: str, folder: Path, dtype_name: str) -> None:
    """In the child process: import, measure, print one RESULT line of JSON."""
    import_everything()
    began = time.perf_counter()
    result = CASES[name](folder, dtype_name)
    result["wall"] = round(time.perf_counter() - began, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_case_in_subprocess(name: str, folder: Path, dtype_name: str) -> dict:
    """A fresh Python for each case: nothing one case loaded or allocated is in the other's process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--folder", str(folder),
               "--dtype", dtype_name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"case {name!r} failed (exit code {done.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----- report -----


def gib(count: int) -> str:
    return f"{count / GIB:.2f} GiB"


def breakdown(delta: dict[str, int]) -> str:
    parts = [f"{name} {gib(delta[name])}" for name in ("RssAnon", "RssFile", "Pss") if name in delta]
    return ", ".join(parts)


def print_file_backed_note(shared: dict[str, int], separate: dict[str, int]) -> None:
    """Weights loaded in the files' own dtype stay memory-mapped from the safetensors files (RssFile): three
    pipelines of one folder map the same pages three times, which RSS counts three times and RAM holds once.
    Pss (shared pages divided among their mappings) says what RAM really holds."""
    if "Pss" not in shared or "Pss" not in separate:
        return
    print(f"  by Pss instead of RSS: shared {gib(shared['Pss'])}, separate {gib(separate['Pss'])}, "
          f"ratio {shared['Pss'] / separate['Pss']:.2f}")
    if separate.get("RssFile", 0) > separate["VmRSS"] / 2:
        print("  note: most of the resident weights are file-backed (safetensors mapped into memory, loaded in "
              "their own dtype); the separate pipelines map the same files three times, counted three times by RSS "
              "but held once in RAM (page cache), so on this CPU the RSS ratio overstates the saving; a copy per "
              "pipeline (another dtype, or a GPU) would make it real")


def print_report(shared: dict, separate: dict, dtype_name: str) -> float:
    """Prints the figures; returns the ratio judged: the larger of the RSS and the Pss ratios (Pss divides
    pages shared between mappings, so it says what RAM really holds)."""
    ratio = shared["delta"]["VmRSS"] / separate["delta"]["VmRSS"]
    if "Pss" in shared["delta"] and "Pss" in separate["delta"]:
        ratio = max(ratio, shared["delta"]["Pss"] / separate["delta"]["Pss"])
    print(f"shared (one manager, 3 tasks warm): {gib(shared['delta']['VmRSS'])} resident "
          f"({breakdown(shared['delta'])}; {shared['wall']} s)")
    print(f"separate (3 pipelines from_pretrained): {gib(separate['delta']['VmRSS'])} resident "
          f"({breakdown(separate['delta'])}; {separate['wall']} s)")
    print(f"ratio {ratio:.2f} (target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'NOT met'})")
    print_file_backed_note(shared["delta"], separate["delta"])
    print(f"cross-check, {dtype_name} weights: the manager holds {gib(shared['manager_bytes'])} by its own accounting "
          f"(live modules {gib(shared['module_bytes'])}, {shared['loads']} loads for {shared['distinct_keys']} "
          f"distinct keys, {shared['unets']} UNet object(s) across the three tasks); "
          f"the separate pipelines hold {gib(separate['module_bytes'])} in {separate['distinct_modules']} modules")
    print(f"seconds, shared: {shared['seconds']}")
    print(f"seconds, separate: {separate['seconds']}")
    print(f"absolute RSS before -> after: shared {gib(shared['before']['VmRSS'])} -> {gib(shared['after']['VmRSS'])}, "
          f"separate {gib(separate['before']['VmRSS'])} -> {gib(separate['after']['VmRSS'])}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help="build the random-weight folder again")
    parser.add_argument("--smoke", action="store_true",
                        help="SD 1.5's layout at tiny widths, to check that the script runs (target not judged)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.folder, args.dtype)
        return

    began = time.perf_counter()
    folder, build_seconds = ensure_folder(args.rebuild, tiny=args.smoke)
    how = f"built in {build_seconds:.0f} s" if build_seconds else "reused"
    model = "SD1.5 layout at tiny widths (smoke run)" if args.smoke else "SD1.5 architecture"
    print(f"{model}, random weights, fp16 safetensors: {folder} ({gib(folder_bytes(folder))} on disk, {how})")
    # float32, the studio's dtype on the CPU: loading the fp16 files then copies the weights into each loader's
    # own memory, as loading onto a GPU does. (Loaded in the files' own dtype, the weights would stay mapped from
    # the files, and three mappings of one file count three times in RSS but take RAM once.)
    dtype_name = "float32"
    print(f"{SIZE}x{SIZE} px, 1 step, CFG {GUIDANCE:g}, CPU, {dtype_name}; each case in a fresh subprocess")
    shared = run_case_in_subprocess("shared", folder, dtype_name)
    separate = run_case_in_subprocess("separate", folder, dtype_name)
    ratio = print_report(shared, separate, dtype_name)
    print(f"wall time {time.perf_counter() - began:.0f} s")
    if args.smoke:  # tiny weights: the activations and the allocator's noise, not the weights, make the ratio
        print("smoke run: the target is not judged")
        return
    sys.exit(0 if ratio <= TARGET else 1)


if __name__ == "__main__":
    main()

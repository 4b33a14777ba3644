"""Model bytes resident with Text to image and Inpaint both warm on one base, divided by the bytes of the same
two pipelines loaded separately (each with its own text encoder and VAE), as diffusers' from_pretrained does.

Two cases: a base with a dedicated 9-channel inpainting checkpoint (the embedded preset), and a base that
inpaints with its own UNet (the same preset without its inpainting checkpoint). Target: <= 0.6 for the second.

    python bench/inpaint_memory.py
    python bench/inpaint_memory.py --smoke  # the same run (the embedded model is small: it takes seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline  # noqa: E402

from studio.core.devices import format_bytes, module_bytes  # noqa: E402
from studio.models.presets import PresetCatalog, load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402

TARGET = 0.6


def shared_bytes(preset) -> int:
    """Both tasks warm in the studio's one memory manager: what it holds, by its own accounting."""
    engine = local_engines(PresetCatalog([preset], preset.name), device_budget=8 * 1024**3).text_to_image
    manager, pipelines = engine.manager, []
    for task in ("text2img", "inpaint"):
        with manager.use(engine.models.keys(preset, task)) as parts:
            pipelines.append(dict(parts))
    # Cross-check the manager's accounting against the modules the two pipelines really hold, each once.
    modules = {id(m): m for parts in pipelines for m in parts.values() if isinstance(m, torch.nn.Module)}
    held = manager.status().device_used
    assert held == sum(module_bytes(m) for m in modules.values()), "the manager's accounting is off"
    return held


def separate_bytes(preset) -> int:
    """The two pipelines as separate from_pretrained calls: two text encoders, two VAEs, two UNets."""
    text2img = StableDiffusionPipeline.from_pretrained(preset.source, dtype=torch.float32)
    inpaint = StableDiffusionInpaintPipeline.from_pretrained(preset.inpaint_source or preset.source, dtype=torch.float32)
    return sum(module_bytes(m) for pipe in (text2img, inpaint) for m in pipe.components.values()
               if isinstance(m, torch.nn.Module))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the same run: its inputs are already the smallest (for tests/test_bench_smoke.py)")
    parser.parse_args()
    embedded = load_presets().get("embedded")
    cases = [
        ("base UNet inpaints (4-channel)", dataclasses.replace(embedded, name="embedded-base", inpaint_local=None)),
        ("dedicated inpainting checkpoint (9-channel)", embedded),
    ]
    print(f"{'case':<46} {'shared':>10} {'separate':>10} {'ratio':>6}")
    for label, preset in cases:
        shared, separate = shared_bytes(preset), separate_bytes(preset)
        ratio = shared / separate
        print(f"{label:<46} {format_bytes(shared):>10} {format_bytes(separate):>10} {ratio:>6.2f}")
    print(f"target for the base-UNet case: <= {TARGET}")


if __name__ == "__main__":
    main()

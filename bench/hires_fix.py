"""What Hires. fix gives on the embedded model, through the studio's engine: 64 px first pass, 128 px result.

For scenes the model is asked for (half of them held-out combinations; a seed no choice was made on), it prints
- how often the oracle reads the prompt's shape, colour and position (all three) in the 64 px image and in the
  128 px Hires. fix result (read at 64 px), for each upscaler;
- how steep the edges are (the mean of the steepest 2% of gradients at 128 px): the 64 px image enlarged
  bicubically, the Hires. fix result, and the scene drawn at 128 px, as ratios to the enlarged image;
- the time of a Hires. fix image over a 64 px image.

    python bench/hires_fix.py [--scenes 40] [--seed 914] [--steps N]
    python bench/hires_fix.py --smoke  # 1 scene at 2 steps: the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.embedded import oracle, scenes  # noqa: E402
from studio.embedded.evaluation import evaluation_scenes  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402
from studio.tasks.hires import HiresFix  # noqa: E402

UPSCALERS = ("Latent", "embedded-rrdbnet-x4", "lanczos")


def edge_steepness(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    rows, columns = np.gradient(grey)
    magnitudes = np.sort(np.hypot(rows, columns).ravel())
    return float(magnitudes[-max(1, magnitudes.size // 50):].mean())


def right(image: Image.Image, scene) -> bool:
    """The prompt's shape, colour and position, as the oracle reads them at the model's native 64 px."""
    reading = oracle.read(image.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)).matches(scene)
    return reading["shape"] and reading["colour"] and reading["position"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=914)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the embedded preset's)")
    parser.add_argument("--smoke", action="store_true", help="1 scene at 2 steps, to check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.scenes, args.steps = 1, 2

    presets = load_presets()
    preset = presets.get("embedded")
    steps = args.steps or preset.default_steps
    engine = local_engines(presets).text_to_image
    settings = dict(preset="embedded", scheduler=preset.default_scheduler, steps=steps,
                    guidance_scale=preset.default_guidance, width=64, height=64)
    correct = {name: 0 for name in ("64 px", *UPSCALERS)}
    steepness = {name: [] for name in ("64 px enlarged", *UPSCALERS, "scene drawn at 128 px")}
    seconds = {name: 0.0 for name in ("64 px", *UPSCALERS)}
    for index, (scene, _) in enumerate(evaluation_scenes(args.scenes, seed=args.seed)):
        request = TextToImageRequest(scenes.caption(scene), seed=args.seed + index, **settings)
        began = time.perf_counter()
        base = engine.generate(request).images[0].image
        seconds["64 px"] += time.perf_counter() - began
        correct["64 px"] += right(base, scene)
        steepness["64 px enlarged"].append(edge_steepness(base.resize((128, 128), Image.Resampling.BICUBIC)))
        steepness["scene drawn at 128 px"].append(edge_steepness(scenes.render(scene, 128)))
        for upscaler in UPSCALERS:
            began = time.perf_counter()
            hires = engine.generate(TextToImageRequest(scenes.caption(scene), seed=args.seed + index,
                                                       hires=HiresFix(upscaler=upscaler), **settings)).images[0].image
            seconds[upscaler] += time.perf_counter() - began
            assert hires.size == (128, 128)
            correct[upscaler] += right(hires, scene)
            steepness[upscaler].append(edge_steepness(hires))

    print(f"{args.scenes} scenes (seed {args.seed}), {steps} steps, CFG {preset.default_guidance:g}; "
          "Hires. fix x2 at denoising strength 0.5, hires steps = steps")
    print("\nprompt's shape, colour and position (oracle at 64 px):")
    for name, count in correct.items():
        label = name if name == "64 px" else f"128 px, Hires. fix with {name}"
        print(f"  {label:46s} {count / args.scenes:6.1%}")
    reference = np.mean(steepness["64 px enlarged"])
    print("\nedge steepness at 128 px, ratio to the 64 px image enlarged bicubically:")
    for name, values in steepness.items():
        label = name if name in ("64 px enlarged", "scene drawn at 128 px") else f"Hires. fix with {name}"
        print(f"  {label:46s} {np.mean(values) / reference:6.2f}")
    print("\ntime of an image, ratio to a 64 px image:")
    for name in UPSCALERS:
        print(f"  Hires. fix with {name:30s} {seconds[name] / seconds['64 px']:6.2f}")


if __name__ == "__main__":
    main()

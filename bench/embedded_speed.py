"""Seconds per native-size image from the embedded model at 20 steps, through the studio's engine.

The engine path is the app's: ModelManager lease, fresh scheduler, the preset's default guidance (so the
UNet runs twice per step), PNG parameters. Prints the median over rounds and its ratio to the 0.5 s target.

    python bench/embedded_speed.py [--rounds 15] [--steps 20]
    python bench/embedded_speed.py --smoke  # 1 round of 1 step: the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402

TARGET_S = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 step, to check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps = 1, 1

    presets = load_presets()
    preset = presets.get("embedded")
    engine = local_engines(presets).text_to_image
    request = TextToImageRequest(
        "a large red circle in the center on a blue background", preset="embedded", scheduler=preset.default_scheduler,
        steps=args.steps, guidance_scale=preset.default_guidance, width=preset.default_width,
        height=preset.default_height, seed=1,
    )
    engine.generate(request)  # warm-up: loading and first-call allocations are not per-image cost
    times = []
    for _ in range(args.rounds):
        began = time.perf_counter()
        engine.generate(request)
        times.append(time.perf_counter() - began)
    median = statistics.median(times)
    print(f"embedded, {preset.default_width}x{preset.default_height}, {args.steps} steps, CFG {preset.default_guidance}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"seconds per image: median {median:.3f} (min {min(times):.3f}, max {max(times):.3f})")
    print(f"ratio to the {TARGET_S} s target: {median / TARGET_S:.2f} ({'met' if median <= TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()

"""What live previews cost per image: a preview every `--every` steps (the default setting's interval) of the
sampler's estimate of the clean image, decoded by the embedded preset's TAESD (the default) and through the
family's latent-to-RGB factors (Fast), handed to a watcher as the UI's job would be. Target: ratio <= 1.03 (the
issue's: a preview must not slow the image it shows by more than 3%).

Times images on the embedded model through the studio's engine, watched (a preview every N steps) and unwatched,
alternating, and prints the ratio watched / unwatched (best of the rounds), the milliseconds per preview, and the
noise floor: a second unwatched series in the same rounds, off ÷ off (on this shared 2-core machine the same
image's time varies by several percent from round to round). The
GPU tier's line (SD 1.5 at 512² with TAESD) is bench/gpu_check.py's, for the day a GPU is at hand.

    python bench/preview_cost.py [--images 4] [--rounds 9] [--steps 20] [--every 0]  # 0: Auto, the default
    python bench/preview_cost.py --smoke  # 1 image of 2 steps, 1 round: the same code, figures meaningless
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.core.jobs import LocalJob  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402
from studio.tasks.previews import AUTO, DEFAULT_PREVIEW_EVERY, FAST, TAESD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=DEFAULT_PREVIEW_EVERY)
    parser.add_argument("--smoke", action="store_true", help="1 image of 2 steps, 1 round: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.rounds, args.steps = 1, 1, 2
    engine = local_engines(load_presets()).text_to_image
    for mode in (TAESD, FAST):  # TAESD: the default setting (the embedded preset's own decoder)
        measure(engine, mode, args)


def measure(engine, mode: str, args) -> None:
    request = TextToImageRequest(prompt="a red circle on a blue background", seed=1, steps=args.steps,
                                 batch_size=args.images, live_preview=mode, preview_every=args.every)
    shown = []

    def seconds(watched: bool) -> float:
        job = LocalJob(on_preview=lambda image, part: shown.append(image)) if watched else LocalJob()
        with engine.model_files(engine.plan(request)) as plan:
            start = time.perf_counter()
            engine.run(plan, job)
            return time.perf_counter() - start

    seconds(True)  # warm: the models loaded once
    shown.clear()
    unwatched, watched, again = [], [], []  # `again`: unwatched too, the noise floor (off ÷ off)
    for _ in range(args.rounds):
        unwatched.append(seconds(False))
        watched.append(seconds(True))
        again.append(seconds(False))
    previews = len(shown) // args.rounds
    best_off, best_on = min(unwatched), min(watched)
    default = " (the default)" if mode == TextToImageRequest.live_preview else ""
    every = "Auto (at most 3% of the time)" if args.every == AUTO else f"every {args.every} step(s)"
    size = f"{shown[-1].width} px" if shown else "no"
    print(f"{mode}{default}: {args.images} images of {args.steps} steps, {size} previews {every}, {previews} per "
          f"run, best of {args.rounds}: off {best_off:.3f} s, on "
          f"{best_on:.3f} s; ratio {best_on / best_off:.3f} (target <= 1.03); "
          f"{(best_on - best_off) / max(previews, 1) * 1000:.2f} ms per preview; noise: off ÷ off "
          f"{min(again) / best_off:.3f}")

if __name__ == "__main__":
    main()

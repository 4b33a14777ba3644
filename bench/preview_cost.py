"""What live previews cost per image: a preview every `--every` steps (the default setting's interval) of the
sampler's estimate of the clean image, decoded by the embedded preset's TAESD (the default) and through the
family's latent-to-RGB factors (Fast), handed to a watcher as the UI's job would be. Target: ratio <= 1.03 (the
issue's: a preview must not slow the image it shows by more than 3%).

Times images on the embedded model through the studio's engine, watched (a preview every N steps) and unwatched,
alternating, and prints the ratio watched / unwatched (the median over the rounds of each round's pair), the
milliseconds per preview, and the noise floor: a second unwatched run in each round, off ÷ off (on this shared
2-core machine the same image's time varies by several percent from round to round). The
GPU tier's line (SD 1.5 at 512² with TAESD) is bench/gpu_check.py's, for the day a GPU is at hand.

    python bench/preview_cost.py [--images 4] [--rounds 15] [--steps 20] [--every 0]  # 0: Auto, the default
    python bench/preview_cost.py --smoke  # 1 image of 2 steps, 1 round: the same code, figures meaningless
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.core.jobs import LocalJob  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402
from studio.tasks.previews import AUTO, DEFAULT_PREVIEW_EVERY, FAST, TAESD, PreviewCosts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=DEFAULT_PREVIEW_EVERY)
    parser.add_argument("--smoke", action="store_true", help="1 image of 2 steps, 1 round: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.rounds, args.steps = 1, 1, 2
    engine = local_engines(load_presets()).text_to_image
    engine.preview_costs = TimedCosts()
    for mode in (TAESD, FAST):  # TAESD: the default setting (the embedded preset's own decoder)
        measure(engine, mode, args)


class TimedCosts(PreviewCosts):
    """The engine's record of what previews take, also summing them: the share of a watched run's time that went
    into its previews, measured inside the run (the end-to-end ratio's noise does not touch it)."""

    def __init__(self):
        super().__init__()
        self.total = 0.0

    def record(self, way: str, pixels: int, seconds: float) -> None:
        self.total += seconds
        super().record(way, pixels, seconds)


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
    engine.preview_costs.total = 0.0
    unwatched, watched, again = [], [], []  # `again`: unwatched too, the noise floor (off ÷ off)
    for _ in range(args.rounds):
        unwatched.append(seconds(False))
        watched.append(seconds(True))
        again.append(seconds(False))
    previews = len(shown) // args.rounds
    # each round's watched time ÷ the unwatched one just before it, the median of the rounds: slow drifts of the
    # shared machine cancel within a round, and one disturbed round does not decide
    ratio = statistics.median(on / off for on, off in zip(watched, unwatched))
    noise = statistics.median(off_again / off for off_again, off in zip(again, unwatched))
    median_off, median_on = statistics.median(unwatched), statistics.median(watched)
    default = " (the default)" if mode == TextToImageRequest.live_preview else ""
    every = "Auto (at most 3% of the time)" if args.every == AUTO else f"every {args.every} step(s)"
    size = f"{shown[-1].width} px" if shown else "no"
    print(f"{mode}{default}: {args.images} images of {args.steps} steps, {size} previews {every}, {previews} per "
          f"run; median of {args.rounds} rounds: off {median_off:.3f} s, on {median_on:.3f} s; ratio {ratio:.3f} "
          f"(target <= 1.03); {(median_on - median_off) / max(previews, 1) * 1000:.2f} ms per preview; noise: "
          f"off ÷ off {noise:.3f}; previews took {engine.preview_costs.total / sum(watched):.1%} of the watched "
          "runs' time (timed inside them)")

if __name__ == "__main__":
    main()

"""Fairness between visitors, measured through the API: while one visitor's batch of 8 images at 100 steps runs,
how long does another visitor's single 20-step image take? Printed as a ratio to (its time alone + one 100-step
image), the bound jobs that take turns between images should meet (target <= 1.5). With --concurrency 1 (one job
at a time, the old behaviour) the quick image waits for the whole batch.

    python bench/fairness.py
    python bench/fairness.py --smoke  # --concurrency 4 only, a 2 x 10-step batch, 1-step quick images, no repeats:
                                      # the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_overhead import free_port, start_app  # noqa: E402

REQUEST = dict(prompt="a red circle on a blue background", negative_prompt="", preset="embedded", scheduler="Euler",
               guidance_scale=3.0, width=64, height=64, style="None")
TARGET = 1.5


@dataclasses.dataclass(frozen=True)
class Workload:
    quick_steps: int = 20  # the other visitor's single image
    long_steps: int = 100  # each image of the long batch
    batch_size: int = 8
    quick_repeats: int = 3  # the quick image alone: the median of this many
    long_repeats: int = 2  # one long image alone: the median of this many


SMOKE = Workload(quick_steps=1, long_steps=10, batch_size=2, quick_repeats=1, long_repeats=1)


def generate(url: str, **settings):
    return Client(url, verbose=False).predict(**(REQUEST | settings), api_name="/text_to_image")


def timed(call) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def denoising(job) -> bool:
    """Whether a submitted text-to-image job is denoising: a live preview has come (its step in the caption), or
    its progress counts steps (before the first preview)."""
    if job.outputs():
        return True
    progress = job.status().progress_data
    return bool(progress and progress[0].index)


def quick_image_wait_ratio(url: str, work: Workload = Workload()) -> tuple[float, dict]:
    """(time of a quick image during a long batch) / (its time alone + one long image), and the figures."""
    quick = dict(steps=work.quick_steps, seed=1, batch_size=1)
    generate(url, **quick)  # warm: models loaded, first-call allocations done
    alone = statistics.median(timed(lambda: generate(url, **quick)) for _ in range(work.quick_repeats))
    one_long_image = statistics.median(timed(lambda: generate(url, steps=work.long_steps, seed=2, batch_size=1))
                                       for _ in range(work.long_repeats))
    batch = Client(url, verbose=False).submit(**(REQUEST | dict(steps=work.long_steps, seed=3,
                                                                batch_size=work.batch_size)),
                                              api_name="/text_to_image")
    deadline = time.monotonic() + 60
    while not denoising(batch):
        if batch.done():
            raise RuntimeError("the long batch finished before its progress was seen: make it longer")
        if time.monotonic() > deadline:
            raise RuntimeError("the long batch never started")
        time.sleep(0.05)
    waited = timed(lambda: generate(url, **quick))  # submitted while the batch is denoising
    batch_was_still_running = not batch.done()
    batch.result(timeout=600)
    figures = dict(alone=alone, one_long_image=one_long_image, waited=waited,
                   batch_was_still_running=batch_was_still_running)
    return waited / (alone + one_long_image), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="--concurrency 4 only, short jobs, no repeats, to "
                        "check that the script runs")
    args = parser.parse_args()
    work, concurrencies = (SMOKE, (4,)) if args.smoke else (Workload(), (4, 1))
    for concurrency in concurrencies:
        port = free_port()
        process = start_app(port, "--concurrency", str(concurrency))
        try:
            ratio, figures = quick_image_wait_ratio(f"http://127.0.0.1:{port}", work)
        finally:
            process.terminate()
            process.wait(timeout=20)
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"--concurrency {concurrency}: quick image alone {figures['alone']:.2f} s, one {work.long_steps}-step "
              f"image {figures['one_long_image']:.2f} s, quick image during the {work.batch_size} x "
              f"{work.long_steps} batch {figures['waited']:.2f} s: "
              f"ratio {ratio:.2f} (target <= {TARGET}: {verdict}); the batch was "
              f"{'still running' if figures['batch_was_still_running'] else 'already done'} when it came")


if __name__ == "__main__":
    main()

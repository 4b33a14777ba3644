"""Outpainting and soft inpainting on the embedded model, through the studio's Inpainter, read by the oracle
(studio/embedded/canvas_evaluation.py says what each figure is).

- outpaint: scenes whose shape the right border cuts, extended right by what was cut: how often the extension
  continues one shape of the right colour on the right background (the issue's bar: 85%), and the seam (the colour
  step across the old border over the background's own; 1 = none), for each pre-fill at strength 0.85 and at 1;
- soft inpainting against the hard mask on the stroke-coherence cases: the share of clean results and the seam
  along the mask's edge and where its blur ends (where the paste-back stops).

    python bench/outpaint_quality.py [--cases 40]
    python bench/outpaint_quality.py --smoke  # 1 case at 2 steps: the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.embedded.canvas_evaluation import evaluate_outpaint, evaluate_soft  # noqa: E402
from studio.models.loras import LoraCatalog  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="1 case at 2 steps, to check that the script runs")
    args = parser.parse_args()
    steps = 2 if args.smoke else None
    cases = 1 if args.smoke else args.cases

    engines = local_engines(load_presets(), device_budget=4 * 1024**3, loras=LoraCatalog({}), version="bench")
    started = time.perf_counter()
    print(f"outpaint, {cases} scenes cut by the right border, extended right by the cut (16-32 px of 64):")
    print(f"  {'pre-fill':<18} {'strength':>8} {'continues':>10} {'seam ratio':>11}")
    for row in evaluate_outpaint(engines.inpainter, cases, steps=steps):
        print(f"  {row['fill']:<18} {row['strength']:>8g} {row['continues']:>9.0%} {row['seam']:>11.2f}")
    print(f"soft inpainting, {cases} stroke-coherence cases:")
    print(f"  {'setting':<16} {'mask blur':>9} {'clean':>6} {'seam ratio':>11} {'at the blur end':>16}")
    for row in evaluate_soft(engines.inpainter, cases, steps=steps):
        print(f"  {row['setting']:<16} {row['mask blur']:>9} {row['clean']:>6.0%} {row['seam']:>11.2f} "
              f"{row['outer seam']:>16.2f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

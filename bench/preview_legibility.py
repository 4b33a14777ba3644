"""Whether the embedded family's live previews show what the image will be: the oracle reads the preview at a
quarter, half, three quarters and all of the steps, and each reading is compared with the finished image's. Fast
previews are the 16×16 latents as RGB through the family's factors, enlarged to the image's 64 px as the page
enlarges them; TAESD previews are decoded at 64 px by the family's tiny decoder (models/embedded-taesd). The Fast
line decided that the family needed that decoder (issue [4/7]: train one if the linear preview is too blurred to
show the shape).

Prompts: the evaluation's scenes (half from held-out triples), at the preset's defaults.

    python bench/preview_legibility.py [--count 100]
    python bench/preview_legibility.py --smoke  # 2 prompts: the same code, figures meaningless
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from studio.core.jobs import LocalJob  # noqa: E402
from studio.embedded import oracle  # noqa: E402
from studio.embedded.evaluation import embedded_defaults, evaluation_scenes, plain_caption  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402
from studio.tasks.previews import FAST, TAESD  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
ATTRIBUTES = ("shape", "colour", "background", "position")
MODES = (FAST, TAESD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="2 prompts: checks that the script runs")
    args = parser.parse_args()
    count = 2 if args.smoke else args.count
    engine = local_engines(load_presets()).text_to_image
    defaults = embedded_defaults()
    agree = {(mode, fraction): dict.fromkeys(ATTRIBUTES, 0) for mode in MODES for fraction in FRACTIONS}
    for index, (scene, _) in enumerate(evaluation_scenes(count)):
        for mode in MODES:
            shown: list[Image.Image] = []
            request = TextToImageRequest(prompt=plain_caption(scene), seed=1000 + index, steps=defaults["steps"],
                                         scheduler=defaults["scheduler"], guidance_scale=defaults["guidance_scale"],
                                         live_preview=mode, preview_every=1)
            with engine.model_files(engine.plan(request)) as plan:
                job = LocalJob(on_preview=lambda preview, part: shown.append(preview))
                image = engine.run(plan, job).images[0].image
            final = oracle.read(image)
            for fraction in FRACTIONS:
                preview = shown[max(0, round(fraction * len(shown)) - 1)]
                reading = oracle.read(preview.resize(image.size, Image.Resampling.BILINEAR))
                for attribute in ATTRIBUTES:
                    agree[mode, fraction][attribute] += getattr(reading, attribute) == getattr(final, attribute)
    print(f"{count} images of {defaults['steps']} steps ({defaults['scheduler']}, CFG {defaults['guidance_scale']:g}); "
          "the oracle's reading of each preview agrees with the finished image's:")
    print("  preview  at the step  " + "  ".join(f"{attribute:>10}" for attribute in ATTRIBUTES))
    for mode in MODES:
        for fraction in FRACTIONS:
            print(f"  {mode:<7}  {fraction:>6.0%} in  " + "  ".join(
                f"{agree[mode, fraction][attribute] / count:>10.0%}" for attribute in ATTRIBUTES))

if __name__ == "__main__":
    main()

"""Whether the embedded family's Fast live preview shows what the image will be: the oracle reads the preview (the
16×16 latents as RGB through the family's factors, enlarged to the image's 64 px as the page enlarges it) at a
quarter, half, three quarters and all of the steps, and each reading is compared with the finished image's. It
decides whether the family needs a tiny TAESD-style decoder (issue [4/7]: train one if the linear preview is too
blurred to show the shape).

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

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
ATTRIBUTES = ("shape", "colour", "background", "position")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="2 prompts: checks that the script runs")
    args = parser.parse_args()
    count = 2 if args.smoke else args.count
    engine = local_engines(load_presets()).text_to_image
    defaults = embedded_defaults()
    agree = {fraction: dict.fromkeys(ATTRIBUTES, 0) for fraction in FRACTIONS}
    for index, (scene, _) in enumerate(evaluation_scenes(count)):
        shown: list[Image.Image] = []
        request = TextToImageRequest(prompt=plain_caption(scene), seed=1000 + index, steps=defaults["steps"],
                                     scheduler=defaults["scheduler"], guidance_scale=defaults["guidance_scale"],
                                     preview_every=1)
        with engine.model_files(engine.plan(request)) as plan:
            image = engine.run(plan, LocalJob(on_preview=lambda preview, part: shown.append(preview))).images[0].image
        final = oracle.read(image)
        for fraction in FRACTIONS:
            preview = shown[max(0, round(fraction * len(shown)) - 1)].resize(image.size, Image.Resampling.BILINEAR)
            reading = oracle.read(preview)
            for attribute in ATTRIBUTES:
                agree[fraction][attribute] += getattr(reading, attribute) == getattr(final, attribute)
    print(f"{count} images of {defaults['steps']} steps ({defaults['scheduler']}, CFG {defaults['guidance_scale']:g}); "
          "the oracle's reading of the Fast preview agrees with the finished image's:")
    print("  at the step  " + "  ".join(f"{attribute:>10}" for attribute in ATTRIBUTES))
    for fraction in FRACTIONS:
        print(f"  {fraction:>6.0%} in  " + "  ".join(f"{agree[fraction][attribute] / count:>10.0%}"
                                                  for attribute in ATTRIBUTES))


if __name__ == "__main__":
    main()

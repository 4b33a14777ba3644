"""Does an up-weighted word move the embedded model's image the asked way? A1111's emphasis against compel's own.

"a red yellow circle on a white background" gives an orange circle. With `(red:W)` the circle should come out
redder, with `(yellow:W)` yellower; the shape's mean green channel (read with the oracle's shape mask) tells which.
For each seed it compares the two up-weightings, under
- A1111's emphasis (what the studio does: token embedding × weight, window scaled back to its mean), and
- compel's own weighting (the token pushed away from the empty prompt's embedding),
and prints how often the yellow up-weighting is the greener (the asked direction), and the mean green channel.

    python bench/prompt_weights.py [--seeds 24] [--first-seed 5000] [--weight 1.5] [--steps N]
    python bench/prompt_weights.py --smoke  # 1 seed at 2 steps: the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.a1111 import prompts  # noqa: E402
from studio.a1111.schedulers import make_scheduler  # noqa: E402
from studio.embedded.evaluation import embedded_defaults, load_text_to_image  # noqa: E402
from studio.embedded.oracle import background_colour, shape_mask  # noqa: E402
from studio.models.families import family_named  # noqa: E402

CPU = torch.device("cpu")
PROMPT = "a {red} {yellow} circle on a white background"


def compel_weighting(pipe, prompt: str) -> dict:
    """compel's own weighting of the same parsed fragments (its FlattenedPrompt path)."""
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt, Fragment

    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)

    def encode(text):
        fragments = [Fragment(t, w) for t, w in prompts.parse_attention(text)]
        (tensor, _), _ = compel.build_conditioning_tensor_for_prompt_object(FlattenedPrompt(fragments))
        return tensor

    return {"prompt_embeds": encode(prompt), "negative_prompt_embeds": encode("")}


def a1111_weighting(pipe, prompt: str) -> dict:
    return family_named("embedded").encode_prompt(pipe, prompt, "", True, 1, CPU)


def shape_green(image) -> float:
    pixels = np.asarray(image, dtype=np.float32)
    mask = shape_mask(pixels, background_colour(pixels))
    return float(pixels[mask][:, 1].mean()) if mask.sum() >= 20 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--first-seed", type=int, default=5000)
    parser.add_argument("--weight", type=float, default=1.5)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the embedded preset's)")
    parser.add_argument("--smoke", action="store_true", help="1 seed at 2 steps, to check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps = 1, 2
    pipe, defaults = load_text_to_image(Path("models")), embedded_defaults()
    steps = args.steps or defaults["steps"]
    variants = {"plain": PROMPT.format(red="red", yellow="yellow"),
                "red up": PROMPT.format(red=f"(red:{args.weight:g})", yellow="yellow"),
                "yellow up": PROMPT.format(red="red", yellow=f"(yellow:{args.weight:g})")}
    print(f"{args.seeds} seeds from {args.first_seed}; weight {args.weight:g}; mean green channel of the shape "
          "(red 0, yellow 255)")
    for name, weighting in (("A1111 emphasis (the studio)", a1111_weighting), ("compel's weighting", compel_weighting)):
        greens = {variant: [] for variant in variants}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for variant, prompt in variants.items():
                with torch.inference_mode():
                    embeds = weighting(pipe, prompt)
                pipe.scheduler = make_scheduler(defaults["scheduler"], pipe.scheduler.config)
                image = pipe(**embeds, num_inference_steps=steps, guidance_scale=defaults["guidance_scale"],
                             width=defaults["size"], height=defaults["size"],
                             generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                greens[variant].append(shape_green(image))
        red_up, yellow_up = np.array(greens["red up"]), np.array(greens["yellow up"])
        asked_way = int(np.sum(yellow_up > red_up))
        means = ", ".join(f"{variant} {np.nanmean(values):.1f}" for variant, values in greens.items())
        print(f"{name:>28}: yellow-up greener than red-up in {asked_way}/{args.seeds} seeds; mean green: {means}")


if __name__ == "__main__":
    main()

"""What a LoRA costs per image. It is a patch of the memory manager's: merged into the text encoder's and the
denoiser's weights once per job (the weights it changes kept in RAM), kept across the job's images, and the kept
weights put back before another job's turn. Target: ratio <= 1.10.

Times a batch of images on the embedded model through the studio's engine, without a LoRA and with one (the
shipped loras/hexagon.safetensors, or --lora), alternating, and prints the ratio with/without, and the time the
LoRA adds per image (merging and putting back, shared by the batch's images).

    python bench/lora_overhead.py [--images 8] [--rounds 3] [--steps 20]
    python bench/lora_overhead.py --smoke  # 1 image of 1 step, 1 round: the same code, figures meaningless
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402
from studio.tasks.generation import TextToImageRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora", default="hexagon")
    parser.add_argument("--smoke", action="store_true", help="1 image of 1 step, 1 round: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.rounds, args.steps = 1, 1, 1
    engine = local_engines(load_presets()).text_to_image
    prompt = "a red hexagon on a blue background"

    def seconds(text: str) -> float:
        request = TextToImageRequest(prompt=text, seed=1, steps=args.steps, batch_size=args.images)
        start = time.perf_counter()
        engine.generate(request)
        return time.perf_counter() - start

    seconds(f"{prompt} <lora:{args.lora}:1>")  # warm: models and the LoRA loaded once
    plain, with_lora = [], []
    for _ in range(args.rounds):
        plain.append(seconds(prompt))
        with_lora.append(seconds(f"{prompt} <lora:{args.lora}:1>"))
    best_plain, best_lora = min(plain), min(with_lora)
    print(f"{args.images} images of {args.steps} steps, best of {args.rounds}: without {best_plain:.2f} s, "
          f"with LoRA {best_lora:.2f} s; ratio {best_lora / best_plain:.3f}; "
          f"{(best_lora - best_plain) / args.images * 1000:.0f} ms per image for the adapters")


if __name__ == "__main__":
    main()

"""Train and evaluate the embedded model family.

    python -m studio.embedded train        # every stage in order; run it again to resume where it stopped
    python -m studio.embedded evaluate     # the quality table (oracle, PSNR, CLIP ranking)
    python -m studio.embedded samples      # docs/embedded-samples.png, outputs with their prompts
    python -m studio.embedded train-lora   # loras/hexagon.safetensors: a LoRA that teaches the model hexagons
    python -m studio.embedded evaluate-lora  # how often a hexagon prompt gives one, with the LoRA and without
    python -m studio.embedded train-controlnet     # models/embedded-controlnet-scribble: sketches -> shapes
    python -m studio.embedded evaluate-controlnet  # sketch to image on held-out sketches, with and without it
    python -m studio.embedded train-flow     # models/embedded-flux: the FLUX-shaped flow transformer
    python -m studio.embedded evaluate-flow  # its table: each flow sampler, the shift, CFG (oracle)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studio.embedded.family import MODELS_DIR, RUN_DIR, SMOKE_PLAN, TRAINING_PLAN, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m studio.embedded", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train every stage (resumable)")
    train_parser.add_argument("--stage", action="append", choices=list(TRAINING_PLAN), help="only these stages")
    train_parser.add_argument("--run-dir", default=RUN_DIR, help="checkpoints and logs (default: %(default)s)")
    train_parser.add_argument("--models-dir", default=MODELS_DIR, help="where weights go (default: %(default)s)")
    train_parser.add_argument("--smoke", action="store_true", help="a few steps of each stage, to check the code")
    evaluate_parser = sub.add_parser("evaluate", help="print the quality table")
    evaluate_parser.add_argument("--models-dir", default=MODELS_DIR)
    evaluate_parser.add_argument("--prompts", type=int, default=200, help="text-to-image prompts (half held out)")
    samples_parser = sub.add_parser("samples", help="save a sheet of sample outputs with their prompts")
    samples_parser.add_argument("--models-dir", default=MODELS_DIR)
    samples_parser.add_argument("--out", default="docs/embedded-samples.png")
    add_lora_commands(sub)
    add_controlnet_commands(sub)
    add_preview_decoder_command(sub)
    add_flow_command(sub)
    args = parser.parse_args(argv)

    if args.command == "train":
        plan = SMOKE_PLAN if args.smoke else TRAINING_PLAN
        results = train(args.run_dir, args.models_dir, plan, only=args.stage)
        total = sum(result.seconds for result in results)
        for result in results:
            print(f"{result.name:>9}: {result.steps:>5} steps, {result.seconds / 60:5.1f} min, loss {result.final_loss}, {result.checks}")
        print(f"    total: {total / 60:.1f} min")
    elif args.command in ("train-lora", "evaluate-lora"):
        run_lora_command(args)
    elif args.command in ("train-controlnet", "evaluate-controlnet"):
        run_controlnet_command(args)
    elif args.command == "train-preview-decoder":
        run_preview_decoder_command(args)
    elif args.command in ("train-flow", "evaluate-flow"):
        run_flow_command(args)
    elif args.command == "samples":
        from studio.embedded.evaluation import sample_sheet

        sample_sheet(args.models_dir).save(args.out)
        print(f"Saved {args.out}")
    else:
        from studio.embedded.report import evaluate, format_table

        print(format_table(evaluate(args.models_dir, prompt_count=args.prompts)))
    sys.stdout.flush()


def add_lora_commands(sub) -> None:
    from studio.embedded.lora import LORA_OUT, LoraRecipe

    default = LoraRecipe()
    train_lora = sub.add_parser("train-lora", help="train the hexagon LoRA on the frozen embedded model")
    train_lora.add_argument("--out", default=LORA_OUT, help="the .safetensors file (default: %(default)s)")
    train_lora.add_argument("--steps", type=int, default=default.steps, help="default: %(default)s")
    train_lora.add_argument("--rank", type=int, default=default.rank, help="default: %(default)s")
    train_lora.add_argument("--models-dir", default=MODELS_DIR)
    train_lora.add_argument("--smoke", action="store_true", help="a few steps on a few scenes, to check the code")
    evaluate_lora = sub.add_parser("evaluate-lora", help="hexagon and circle rates with the LoRA and without")
    evaluate_lora.add_argument("--lora", default=LORA_OUT, help="default: %(default)s")
    evaluate_lora.add_argument("--count", type=int, default=50, help="seeds per prompt (default: %(default)s)")
    evaluate_lora.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight (default: %(default)s)")
    evaluate_lora.add_argument("--models-dir", default=MODELS_DIR)


def run_lora_command(args) -> None:
    from dataclasses import replace

    from studio.embedded.lora import (
        SMOKE_RECIPE,
        LoraRecipe,
        format_lora_report,
        lora_rates,
        oracle_shape_accuracy,
        train_lora,
    )

    if args.command == "train-lora":
        recipe = SMOKE_RECIPE if args.smoke else LoraRecipe()
        if not args.smoke:
            recipe = replace(recipe, steps=args.steps, rank=args.rank)
        result = train_lora(Path(args.out), recipe, Path(args.models_dir))
        print(f"final loss {result['final_loss']}, {result['seconds'] / 60:.1f} min, recipe {result['recipe']}")
    else:
        rates = lora_rates(Path(args.lora), args.count, models_dir=Path(args.models_dir), weight=args.weight)
        print(format_lora_report(rates, oracle_shape_accuracy()))


def add_training_command(sub, name: str, help_text: str, default) -> None:
    """A resumable stage's command: its steps and batch size (defaults: the recipe's), folders, --smoke."""
    train = sub.add_parser(name, help=help_text)
    train.add_argument("--steps", type=int, default=default.steps, help="default: %(default)s")
    train.add_argument("--batch-size", type=int, default=default.batch_size, help="default: %(default)s")
    train.add_argument("--run-dir", default=RUN_DIR, help="checkpoints and logs (default: %(default)s)")
    train.add_argument("--models-dir", default=MODELS_DIR)
    train.add_argument("--smoke", action="store_true", help="a few steps, to check the code")


def add_controlnet_commands(sub) -> None:
    from studio.embedded.controlnet import ControlNetRecipe

    add_training_command(sub, "train-controlnet", "train the embedded scribble ControlNet (resumable)",
                         ControlNetRecipe())
    evaluate = sub.add_parser("evaluate-controlnet", help="sketch to image on held-out sketches, with and without it")
    evaluate.add_argument("--count", type=int, default=100, help="sketches (default: %(default)s)")
    evaluate.add_argument("--models-dir", default=MODELS_DIR)


def run_controlnet_command(args) -> None:
    from studio.embedded.controlnet import (
        SMOKE_RECIPE,
        ControlNetRecipe,
        evaluate_sketch_to_image,
        format_scores,
        train_controlnet,
    )

    if args.command == "train-controlnet":
        recipe = SMOKE_RECIPE if args.smoke else ControlNetRecipe(args.steps, args.batch_size)
        result = train_controlnet(Path(args.run_dir), Path(args.models_dir), recipe)
        print(f"controlnet: {result.steps} steps, {result.seconds / 60:.1f} min, loss {result.final_loss}, "
              f"{result.checks}")
    else:
        print(format_scores(evaluate_sketch_to_image(Path(args.models_dir), args.count)))


def add_preview_decoder_command(sub) -> None:
    from studio.embedded.preview_decoder import PreviewDecoderRecipe

    add_training_command(sub, "train-preview-decoder", "train the embedded TAESD for live previews (resumable)",
                         PreviewDecoderRecipe())


def run_preview_decoder_command(args) -> None:
    from studio.embedded.preview_decoder import SMOKE_RECIPE, PreviewDecoderRecipe, train_preview_decoder

    recipe = SMOKE_RECIPE if args.smoke else PreviewDecoderRecipe(args.steps, args.batch_size)
    result = train_preview_decoder(Path(args.run_dir), Path(args.models_dir), recipe)
    print(f"preview decoder: {result.steps} steps, {result.seconds / 60:.1f} min, loss {result.final_loss}, "
          f"{result.checks}")


def add_flow_command(sub) -> None:
    from studio.embedded.flow import FlowRecipe

    add_training_command(sub, "train-flow", "train the embedded FLUX-shaped flow transformer (resumable)", FlowRecipe())
    evaluate_parser = sub.add_parser("evaluate-flow", help="the flow model's table: samplers, shift, CFG")
    evaluate_parser.add_argument("--models-dir", default=MODELS_DIR)
    evaluate_parser.add_argument("--prompts", type=int, default=200, help="prompts per sampler (half held out)")


def run_flow_command(args) -> None:
    from studio.embedded.flow import SMOKE_RECIPE, FlowRecipe, train_flow

    if args.command == "evaluate-flow":
        from studio.embedded.flow_evaluation import evaluate_flow, format_flow_table

        count = args.prompts
        report = evaluate_flow(Path(args.models_dir), prompt_count=count, shift_count=count * 3 // 10,
                               guidance_count=count // 2, inpaint_count=count // 2, size_count=count // 5)
        print(format_flow_table(report))
        return

    recipe = SMOKE_RECIPE if args.smoke else FlowRecipe(args.steps, args.batch_size)
    for result in train_flow(Path(args.run_dir), Path(args.models_dir), recipe):
        print(f"{result.name}: {result.steps} steps, {result.seconds / 60:.1f} min, loss {result.final_loss}")


if __name__ == "__main__":
    main()

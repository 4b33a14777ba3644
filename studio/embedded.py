"""Build the embedded default model: a small Stable-Diffusion-architecture pipeline in diffusers format.

It is made here from a fixed seed (random weights for now) so the studio runs offline on any machine and the
tests exercise exactly the `from_pretrained` path that Hub presets use.

    python -m studio.embedded build [--out models/embedded-sd]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "models" / "embedded-sd"
SEED = 20261123
MAX_TOKENS = 77


def byte_level_vocab() -> dict[str, int]:
    """Start/end tokens, the 256 byte characters, and the same 256 with the end-of-word suffix.

    With no merges every character is one token, which is enough for short prompts.
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + byte_chars + [c + "</w>" for c in byte_chars]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=MAX_TOKENS
    )


def build_pipeline(work_dir: Path) -> StableDiffusionPipeline:
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(work_dir / "tokenizer-src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # The VAE downsamples by 4 (three blocks), so the native 64 px image is a 16x16 latent: fast on a CPU.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build(out: Path = DEFAULT_OUTPUT) -> Path:
    with tempfile.TemporaryDirectory() as work_dir:
        pipe = build_pipeline(Path(work_dir))
        pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    print(f"Embedded model written to {build(args.out)}")


if __name__ == "__main__":
    main()

"""The embedded family's TAESD: a tiny decoder (diffusers' AutoencoderTiny, the architecture of madebyollin's taesd,
narrowed) trained here to draw the embedded VAE's latents as the VAE's own decoder draws them, for live previews.

The family's latent-to-RGB factors give a 16 × 16 preview that the oracle reads as the finished image shows it only
about half the time (shape and colour; `python bench/preview_legibility.py`), too blurred to show the shape, so the
issue's rule applies: a decoder of its own. It decodes at the image's size in about a millisecond.

    python -m studio.embedded train-preview-decoder   # models/embedded-taesd (under 1 MB), a few minutes
    python bench/preview_legibility.py                # the oracle on Fast and TAESD previews

Its data are random scenes encoded by the embedded VAE, the target each latent's decoding by that VAE (as TAESD is
distilled from its VAE's decoder); a quarter of the latents are blurred first (the sampler's early estimates of
the clean image are blurred latents, and these are what a preview decodes). Its encoder is trained too, to the
VAE's latents, so that the folder is a whole AutoencoderTiny, though the studio only decodes with it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny

from studio.embedded import scenes
from studio.embedded.evaluation import psnr
from studio.embedded.stages import PIPELINE_DIR, SIDE, render_batch
from studio.embedded.training import SEED, Stage

TAESD_DIR = "embedded-taesd"
ARCHITECTURE = dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(32, 32, 32),
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 2, 1), latent_channels=4)
BLURRED_SHARE = 0.25
CHECK_SEED = SEED + 47  # the export's check scenes; training never draws them


@dataclass(frozen=True)
class PreviewDecoderRecipe:
    steps: int = 2500
    batch_size: int = 32
    dataset_size: int = 6000


SMOKE_RECIPE = PreviewDecoderRecipe(steps=3, batch_size=4, dataset_size=16)


def blurred(latents: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Latents smoothed as an early estimate of the clean image is: averaged over 2-4 latent pixels, mixed back."""
    size = int(torch.randint(2, 5, (1,), generator=rng))
    smooth = F.interpolate(F.avg_pool2d(latents, size, ceil_mode=True), size=latents.shape[-2:], mode="bilinear")
    keep = torch.rand(len(latents), 1, 1, 1, generator=rng) * 0.7
    return keep * latents + (1 - keep) * smooth


class PreviewDecoderStage(Stage):
    name = "preview-decoder"
    lr = 2e-3
    warmup = 100

    def __init__(self, run_dir: Path, models_dir: Path, steps: int, batch_size: int, dataset_size: int):
        super().__init__(run_dir, models_dir, steps, batch_size)
        self.dataset_size = dataset_size
        self.data: dict[str, torch.Tensor] = {}

    def build(self) -> torch.nn.Module:
        return AutoencoderTiny(**ARCHITECTURE)

    def vae(self) -> AutoencoderKL:
        return AutoencoderKL.from_pretrained(self.models_dir / PIPELINE_DIR / "vae").eval().requires_grad_(False)

    def prepare(self) -> None:
        """The scenes' images, their VAE latents (a quarter blurred) and each latent's VAE decoding; cached."""
        cache = self.run_dir / f"dataset-{self.dataset_size}.pt"
        if cache.exists():
            self.data = torch.load(cache)
            return
        rng, generator = random.Random(SEED + 45), torch.Generator().manual_seed(SEED + 45)
        vae = self.vae()
        images, latents, targets = [], [], []
        for start in range(0, self.dataset_size, 256):
            batch = render_batch([scenes.random_scene(rng, scenes.all_triples())
                                  for _ in range(min(256, self.dataset_size - start))])
            with torch.no_grad():
                clean = vae.encode(batch).latent_dist.mean * vae.config.scaling_factor
                shown = clean.clone()
                some = torch.rand(len(clean), generator=generator) < BLURRED_SHARE
                shown[some] = blurred(clean[some], generator)
                decoded = vae.decode(shown / vae.config.scaling_factor).sample.clamp(-1, 1)
            images.append(batch.half())
            latents += [torch.stack([clean, shown]).half()]
            targets.append(decoded.half())
        self.data = {"images": torch.cat(images), "latents": torch.cat(latents, dim=1), "targets": torch.cat(targets)}
        torch.save(self.data, cache)

    def loss(self, model: AutoencoderTiny, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
        picked = torch.tensor(rng.sample(range(len(self.data["images"])), self.batch_size))
        clean, shown = (self.data["latents"][which][picked].float() for which in (0, 1))
        decoded = model.decode(shown).sample
        encoded = model.encode(self.data["images"][picked].float()).latents
        return F.l1_loss(decoded, self.data["targets"][picked].float()) + 0.1 * F.mse_loss(encoded, clean)

    def export(self, model: AutoencoderTiny) -> dict:
        folder = self.models_dir / TAESD_DIR
        model.save_pretrained(folder, safe_serialization=True)
        # as madebyollin's config.json: without the block_out_channels diffusers records for pipelines (a TAESD
        # here is no pipeline's VAE), which from_pretrained would warn about at each load
        config = json.loads((folder / "config.json").read_text())
        config.pop("block_out_channels", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        vae, rng = self.vae(), random.Random(CHECK_SEED)
        batch = render_batch([scenes.random_scene(rng, scenes.all_triples()) for _ in range(64)])
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean * vae.config.scaling_factor
            by_vae = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
            by_taesd = AutoencoderTiny.from_pretrained(folder).decode(latents).sample.clamp(-1, 1)
        to_pixels = lambda images: ((images + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()  # noqa: E731
        return {"psnr_against_the_vae_db": round(psnr(to_pixels(by_taesd), to_pixels(by_vae)), 2),
                "parameters": sum(p.numel() for p in model.parameters()),
                "bytes": (folder / "diffusion_pytorch_model.safetensors").stat().st_size, "side": SIDE}


def train_preview_decoder(run_dir: Path, models_dir: Path, recipe: PreviewDecoderRecipe = PreviewDecoderRecipe()):
    stage = PreviewDecoderStage(run_dir, models_dir, recipe.steps, recipe.batch_size, recipe.dataset_size)
    if recipe is SMOKE_RECIPE:
        stage.save_every = 2
    return stage.result() or stage.run()

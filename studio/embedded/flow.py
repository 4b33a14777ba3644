"""The embedded flow family: a small FLUX.1-shaped rectified-flow transformer trained here on the drawn scenes, so
that the FLUX code paths (flow samplers, the schedule's shift, packed latents, T5 prompts, previews) are tested on
a model that draws what it is asked, not only on random weights.

    python -m studio.embedded train-flow     # models/embedded-flux (a FluxPipeline folder; resumable)

Why FLUX-shaped rather than SD 3-shaped: FLUX reads two encoders (CLIP's pooled embedding, T5's sequence), SD 3
three (CLIP-L, CLIP-G, T5); FLUX packs its latents 2×2 into tokens, the layout the studio unpacks for previews
and soft inpainting, which SD 3's patch embedding hides inside the model. The parts:
- the transformer: diffusers' FluxTransformer2DModel, 2 double-stream and 4 single-stream blocks, width 128;
- CLIP: the embedded family's text encoder (models/embedded-sd), frozen; its pooled embedding is FLUX's
  "pooled projection";
- T5: a two-layer T5 v1.1 encoder (gated GELU, as T5-XXL) over a word-level SentencePiece-style vocabulary of the
  captions' words (characters as a fall-back for other words), trained with the transformer;
- the VAE: the embedded family's (4 channels, 64 px → 16 × 16), its config given FLUX's shift factor (0): the
  transformer reads 8 × 8 tokens of 16 channels.
Captions are dropped 10% of the time, so CFG (FLUX's "true CFG") works. Noise levels are drawn logit-normally and
shifted as the scheduler shifts them (SD 3's recipe); the model predicts the velocity noise − image.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from studio.embedded import scenes
from studio.embedded.stages import CFG_DROPOUT, PIPELINE_DIR, SIDE, encode
from studio.embedded.training import SEED, Stage, StageResult

FLOW_DIR = "embedded-flux"
T5_WINDOW = 32  # tokens: the longest caption is 14 words
SHIFT = 3.0  # the schedule's own shift (SD 3's; FLUX.1-dev's shift depends on the image's size, here it is fixed)
LATENT_CHANNELS = 4  # the embedded VAE's


@dataclass(frozen=True)
class FlowRecipe:
    steps: int = 6000
    batch_size: int = 64
    dataset_size: int = 24000
    multisize_steps: int = 1500
    multisize_dataset_size: int = 4000


SMOKE_RECIPE = FlowRecipe(steps=3, batch_size=4, dataset_size=16, multisize_steps=2, multisize_dataset_size=8)


# ----- the parts -----


def caption_words(count: int = 20000, seed: int = SEED + 40) -> list[str]:
    """Every word the training captions use (and the studio's known words), in a fixed order."""
    rng = random.Random(seed)
    words = set()
    for _ in range(count):
        words.update(scenes.caption(scenes.random_scene(rng), rng).replace(",", " ,").split())
    for group in scenes.known_words().values():
        words.update(word for phrase in group for word in phrase.split())
    return sorted(words)


def word_t5_tokenizer(words: list[str]) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style Unigram, "▁" marking a word's start, "</s>" appended; ids as T5's:
    <pad> 0, </s> 1, <unk> 2) whose pieces are the captions' words, each one token; any other word falls back to
    its characters. The words are lower-case: the family lower-cases prompts for it (transformers' T5 tokenizer
    keeps no normalizer of its own)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    pieces += [(f"▁{word}", -1.0) for word in words]
    pieces += [(char, -10.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_WINDOW)


def t5_encoder(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return T5EncoderModel(config)


def flux_transformer(clip_width: int) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=LATENT_CHANNELS * 4, out_channels=LATENT_CHANNELS * 4,
                                  num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                                  joint_attention_dim=64, pooled_projection_dim=clip_width, guidance_embeds=False,
                                  axes_dims_rope=(8, 12, 12))


class FlowModel(torch.nn.Module):
    """The parts trained together (one optimizer, one EMA): the transformer and the T5 encoder."""

    def __init__(self, transformer: FluxTransformer2DModel, t5: T5EncoderModel):
        super().__init__()
        self.transformer, self.t5 = transformer, t5


def image_ids(side: int) -> torch.Tensor:
    """FLUX's position ids of a side × side grid of tokens (row, column), as FluxPipeline makes them."""
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


def shifted(sigmas: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """The scheduler's shift of noise levels (FlowMatchEulerDiscreteScheduler's, static): more time at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ----- the stage -----


class FlowStage(Stage):
    name = "flow"
    lr = 5e-4
    warmup = 200
    ema_decay = 0.999
    dataset_size = 24000

    def __init__(self, *args, source_models: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = Path(source_models) / PIPELINE_DIR  # the embedded family's CLIP and VAE

    @functools.cached_property
    def t5_tokenizer(self) -> T5TokenizerFast:
        """The tokenizer the T5 encoder is sized for, trains on and is exported with (the vocabulary built once)."""
        return word_t5_tokenizer(caption_words())

    def build(self) -> FlowModel:
        clip_width = CLIPTextModel.from_pretrained(self.source / "text_encoder").config.hidden_size
        return FlowModel(flux_transformer(clip_width), t5_encoder(self.t5_tokenizer))

    def vae(self) -> AutoencoderKL:
        return AutoencoderKL.from_pretrained(self.source / "vae").eval().requires_grad_(False)

    def prepare(self) -> None:
        self._clip_tokenizer = CLIPTokenizer.from_pretrained(self.source / "tokenizer")
        self._clip = CLIPTextModel.from_pretrained(self.source / "text_encoder").eval().requires_grad_(False)
        cache = self.run_dir / "dataset.pt"
        if not cache.exists():
            torch.save(self.make_dataset(), cache)
        self._data = torch.load(cache, weights_only=False)

    def make_dataset(self) -> dict:
        rng = random.Random(SEED + 41)
        scene_list = [scenes.random_scene(rng) for _ in range(self.dataset_size)]
        return {"scenes": scene_list, "latents": encode(self.vae(), scene_list)}

    def pooled(self, captions: list[str]) -> torch.Tensor:
        """CLIP's pooled embedding, as FluxPipeline reads it (padded to the tokenizer's window)."""
        tokens = self._clip_tokenizer(captions, padding="max_length", max_length=self._clip_tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self._clip(tokens).pooler_output

    def t5_tokens(self, captions: list[str]) -> torch.Tensor:
        """T5's ids, padded to its window as FluxPipeline pads them (no attention mask: the pads are read too)."""
        return self.t5_tokenizer(captions, padding="max_length", max_length=T5_WINDOW, truncation=True,
                                  return_tensors="pt").input_ids

    def loss(self, model: FlowModel, rng, generator):
        return self.flow_loss(model, self._data, self.batch_size, rng, generator)

    def flow_loss(self, model: FlowModel, data: dict, count: int, rng, generator):
        """The velocity loss on `count` scenes of `data` (latents of one size), their captions dropped at times."""
        indices = [rng.randrange(len(data["scenes"])) for _ in range(count)]
        captions = ["" if rng.random() < CFG_DROPOUT else scenes.caption(data["scenes"][i], rng) for i in indices]
        latents = data["latents"][indices].float()
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = shifted(torch.sigmoid(torch.randn(len(latents), generator=generator)))
        noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
        text = model.t5(self.t5_tokens(captions))[0]
        prediction = model.transformer(hidden_states=packed, encoder_hidden_states=text,
                                       pooled_projections=self.pooled(captions), timestep=sigmas,
                                       img_ids=image_ids(height // 2), txt_ids=torch.zeros(T5_WINDOW, 3)).sample
        return F.mse_loss(prediction, target)

    def export_dir(self) -> Path:
        """Where the stage's model goes: the 64 px model stays in the run's folder (what the fine-tuning starts from,
        kept to compare); only the last stage's is shipped, so an interrupted fine-tuning ships nothing."""
        return self.run_dir / FLOW_DIR

    def export(self, model: FlowModel) -> dict:
        out = self.export_dir()
        vae = self.vae()
        vae.register_to_config(shift_factor=0.0)  # FLUX's pipelines shift latents by it
        scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, use_dynamic_shifting=False)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=self._clip, tokenizer=self._clip_tokenizer,
                            text_encoder_2=model.t5, tokenizer_2=self.t5_tokenizer, transformer=model.transformer)
        pipe.save_pretrained(out, safe_serialization=True)
        return {}


class FlowMultiSizeStage(FlowStage):
    """The flow model fine-tuned on 128 px scenes as much as on 64 px ones (each step one size, picked by the
    step's seed), as the UNet's stage 3b. Trained at 64 px only, it drew the shape several times over at 96 and
    128 px (the prompt's position read right in 23% of images) and lost it at 48 px (shape 63%): FLUX's rotary
    positions had only ever spanned 8 × 8 tokens. What it exports is the shipped model."""

    name = "flow-multisize"
    lr = 2e-4
    warmup = 50
    dataset_size = 4000  # 128 px scenes; the 64 px ones are the flow stage's own
    large_side = 2 * SIDE
    large_fraction = 0.5

    def __init__(self, *args, base: FlowStage, **kwargs):
        super().__init__(*args, source_models=base.source.parent, **kwargs)
        self.base = base

    def build(self) -> FlowModel:
        if not self.base.result():
            raise RuntimeError("The flow-multisize stage fine-tunes the flow model: train the flow stage first.")
        model = super().build()
        model.load_state_dict(self.base.trained_model().state_dict())
        return model

    def prepare(self) -> None:
        super().prepare()  # this stage's 128 px latents
        self.base.prepare()
        self._small = self.base._data

    def export_dir(self) -> Path:
        return self.models_dir / FLOW_DIR

    def make_dataset(self) -> dict:
        rng = random.Random(SEED + 42)
        scene_list = [scenes.random_scene(rng) for _ in range(self.dataset_size)]
        return {"scenes": scene_list, "latents": encode(self.vae(), scene_list, batch_size=64, side=self.large_side)}

    def loss(self, model: FlowModel, rng, generator):
        large = rng.random() < self.large_fraction
        # a quarter of the images at 128 px: each step sees about the same number of tokens
        count = self.batch_size // 4 if large else self.batch_size
        return self.flow_loss(model, self._data if large else self._small, count, rng, generator)


def train_flow(run_dir: Path, models_dir: Path, recipe: FlowRecipe = FlowRecipe(),
               source_models: Path | None = None) -> list[StageResult]:
    """Train (or resume) the flow stage, then its fine-tuning at two sizes, which exports the shipped model to
    `models_dir`/embedded-flux. The CLIP and VAE come from `source_models` (default: `models_dir`)."""
    base = FlowStage(run_dir=run_dir, models_dir=models_dir, steps=recipe.steps, batch_size=recipe.batch_size,
                     source_models=source_models or models_dir)
    base.dataset_size = recipe.dataset_size
    results = [base.result() or base.run()]
    multisize = FlowMultiSizeStage(run_dir=run_dir, models_dir=models_dir, steps=recipe.multisize_steps,
                                   batch_size=recipe.batch_size, base=base)
    multisize.dataset_size = recipe.multisize_dataset_size
    return results + [multisize.result() or multisize.run()]

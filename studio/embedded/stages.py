"""The embedded family, stage by stage, in the order Stable Diffusion's parts were made:
CLIP -> AutoencoderKL -> text-to-image UNet -> inpainting UNet, plus an RRDBNet x4 upscaler.

Each stage writes standard diffusers / transformers / basicsr-format weights (safetensors) under `models/`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel

from studio.embedded import oracle, scenes
from studio.embedded.tokenizer import MAX_TOKENS, build_tokenizer
from studio.embedded.training import SEED, Stage
from studio.embedded.upscaler import UPSCALER_DIR, WEIGHTS
from studio.models.vocabulary import VOCABULARY_FILE

SIDE = 64  # native image size
LATENT_SIDE = 16  # the VAE downsamples by 4
UPSCALE = 4
CFG_DROPOUT = 0.1
PIPELINE_DIR, INPAINT_DIR, CLIP_DIR = "embedded-sd", "embedded-sd-inpainting", "embedded-clip"
# Noise schedule of Stable Diffusion 2 (v-prediction: noise prediction did not learn at this budget).
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
UPSCALER_ARCH = dict(num_in_ch=3, num_out_ch=3, num_feat=32, num_block=3, num_grow_ch=16, scale=UPSCALE)


def render_batch(scene_list: list[scenes.Scene], side: int = SIDE) -> torch.Tensor:
    return torch.from_numpy(scenes.to_tensor_batch([scenes.render(scene, side) for scene in scene_list]))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


# ----- 1. CLIP -----


class ClipStage(Stage):
    """A small CLIP trained contrastively. Batches are groups of scenes that differ in one attribute, so
    every attribute (shape, colour, background, position, size) has to be read to tell captions apart."""

    name = "clip"
    lr = 2e-3
    group = 8
    # Where a shape is was the hardest thing to learn (a first run stayed at chance on it): change the
    # position in 40% of the hard negatives.
    variation_weights = (0.15, 0.15, 0.15, 0.4, 0.15)
    position_probability = size_probability = 0.85  # how often a caption names them

    def tokenizer(self):
        return build_tokenizer(self.run_dir.parent / "tokenizer")

    def build(self) -> CLIPModel:
        tokenizer = self.tokenizer()
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_attention_heads=4,
                num_hidden_layers=3, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ),
            vision_config=dict(
                image_size=SIDE, patch_size=8, hidden_size=96, intermediate_size=256, num_attention_heads=4,
                num_hidden_layers=3,
            ),
            projection_dim=64,
        )
        model = CLIPModel(config)
        _init_patch_positions(model.vision_model.embeddings.position_embedding.weight)
        return model

    def prepare(self) -> None:
        self._tokenizer = self.tokenizer()
        self._seen = frozenset(scenes.seen_triples())

    def sample(self, rng: random.Random) -> list[scenes.Scene]:
        batch = []
        for _ in range(self.batch_size // self.group):
            base = scenes.random_scene(rng)
            batch.append(base)
            batch.extend(
                scenes.vary_one_attribute(rng, base, self._seen, self.variation_weights) for _ in range(self.group - 1)
            )
        return batch

    def loss(self, model, rng, generator):
        batch = self.sample(rng)
        # Some captions leave out the position or the size, as people's prompts do ("a red circle on a blue
        # background"): the text encoder must know those too, or the UNet gets states it never saw (a first
        # family, trained on complete captions only, got such prompts' colours right 28% of the time).
        mentions = [(rng.random() < self.position_probability, rng.random() < self.size_probability) for _ in batch]
        captions = [
            scenes.caption(scene, rng, position_probability=float(position), size_probability=float(size))
            for scene, (position, size) in zip(batch, mentions)
        ]
        input_ids = tokenize(self._tokenizer, captions)
        # A caption that also describes another image of the batch is not a negative for it.
        describes = torch.tensor([[_describes(scene, said, other) for other in batch] for scene, said in zip(batch, mentions)])
        out = model(input_ids=input_ids, pixel_values=render_batch(batch))
        logits = out.logits_per_text.masked_fill(describes & ~torch.eye(len(batch), dtype=torch.bool), -1e4)
        labels = torch.arange(len(batch))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def export(self, model) -> dict:
        out = self.models_dir / CLIP_DIR
        model.save_pretrained(out, safe_serialization=True)
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=Image.Resampling.BICUBIC,
            ),
            tokenizer=self.tokenizer(),
        )
        processor.save_pretrained(out)
        _copy_tokenizer_sources(self.run_dir.parent / "tokenizer", out)
        return {}


def _describes(scene: scenes.Scene, mentions: tuple[bool, bool], other: scenes.Scene) -> bool:
    """Whether a caption of `scene` that names its position and size or not (`mentions`) fits `other` too."""
    mentions_position, mentions_size = mentions
    a, b = scene.main, other.main
    return (
        (scene.background, a.shape, a.colour) == (other.background, b.shape, b.colour)
        and (a.position == b.position or not mentions_position)
        and (a.size == b.size or not mentions_size)
    )


def _init_patch_positions(weight: torch.Tensor) -> None:
    """Start the vision tower's patch position embeddings as 2-D sine/cosine waves (row 0 is the class token),
    so every patch knows where it is from the first step rather than learning it from random values."""
    patches = weight.shape[0] - 1
    grid = int(round(patches**0.5))
    quarter = weight.shape[1] // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    angles_y = ys.reshape(-1, 1) * frequencies
    angles_x = xs.reshape(-1, 1) * frequencies
    waves = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    with torch.no_grad():
        weight.zero_()
        weight[1:, : waves.shape[1]] = waves


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    encoder = CLIPTextModel(clip.config.text_config)
    source = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    target = encoder.state_dict()
    # transformers 5 names CLIPTextModel's weights without the "text_model." prefix CLIPModel uses.
    prefix = "" if "embeddings.token_embedding.weight" in target else "text_model."
    encoder.load_state_dict({prefix + k: v for k, v in source.items()})
    return encoder.eval().requires_grad_(False)


def _copy_tokenizer_sources(source: Path, folder: Path) -> None:
    # The project's own vocab.json / merges.txt sit beside the tokenizer.json transformers writes.
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((source / name).read_bytes())


# ----- 2. AutoencoderKL -----


class VaeStage(Stage):
    """A small AutoencoderKL (x4). Fully convolutional, so it trains on 32 px crops; checked by the oracle."""

    name = "vae"
    lr = 1e-3
    crop = 32
    kl_weight = 1e-6
    check_images = 500  # read back through the exported VAE by the oracle

    def build(self) -> AutoencoderKL:
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
            sample_size=SIDE, mid_block_add_attention=False,
        )

    def loss(self, model, rng, generator):
        batch = render_batch([scenes.random_scene(rng) for _ in range(self.batch_size)])
        top, left = rng.randrange(0, SIDE - self.crop + 1, 4), rng.randrange(0, SIDE - self.crop + 1, 4)
        batch = batch[:, :, top : top + self.crop, left : left + self.crop]
        posterior = model.encode(batch).latent_dist
        reconstruction = model.decode(posterior.sample(generator=generator)).sample
        error = reconstruction - batch
        return error.pow(2).mean() + error.abs().mean() + self.kl_weight * posterior.kl().mean()

    def export(self, model) -> dict:
        rng = random.Random(SEED)
        batch = render_batch([scenes.random_scene(rng, scenes.all_triples()) for _ in range(256)])
        with torch.no_grad():
            latents = model.encode(batch).latent_dist.mean
        model.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
        model.save_pretrained(self.models_dir / PIPELINE_DIR / "vae", safe_serialization=True)
        return {"scaling_factor": model.config.scaling_factor, **vae_oracle_check(model, self.check_images)}


def vae_oracle_check(vae: AutoencoderKL, count: int = 500) -> dict:
    """Pass procedural images (every triple, held-out ones too) through the VAE; the oracle must still agree."""
    rng = random.Random(SEED + 1)
    test = [scenes.random_scene(rng, scenes.all_triples()) for _ in range(count)]
    agree = {key: 0 for key in ("shape", "colour", "background", "position")}
    for start in range(0, count, 64):
        chunk = test[start : start + 64]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(render_batch(chunk)).latent_dist.mean).sample
        for scene, image in zip(chunk, tensor_to_images(decoded)):
            matches = oracle.read(image).matches(scene)
            for key in agree:
                agree[key] += matches[key]
    return {f"vae_{key}": round(value / count, 4) for key, value in agree.items()}


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    array = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


# ----- 3. text-to-image UNet -----


class UnetStage(Stage):
    """Latent diffusion on the frozen VAE's latents, conditioned on the frozen CLIP text encoder,
    with captions dropped 10% of the time so classifier-free guidance works."""

    name = "unet"
    lr = 1e-3
    ema_decay = 0.999
    dataset_size = 24000
    in_channels = 4
    pipeline_class, pipeline_dir = StableDiffusionPipeline, PIPELINE_DIR

    def __init__(self, *args, clip: ClipStage, vae: VaeStage, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_stage, self.vae_stage = clip, vae

    def build(self) -> UNet2DConditionModel:
        # Text enters by cross-attention at the 4x4 level (and the mid block), where a 3x3 conv already
        # knows where it is, so position words steer the layout; 16x16 and 8x8 stay convolutional, which
        # keeps 20 steps with guidance under half a second on two CPU cores.
        return UNet2DConditionModel(
            sample_size=LATENT_SIDE, in_channels=self.in_channels, out_channels=4,
            block_out_channels=(32, 64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
        )

    def prepare(self) -> None:
        self._tokenizer = self.clip_stage.tokenizer()
        self._text_encoder = text_encoder_from_clip(self.clip_stage.trained_model())
        self._noise = DDPMScheduler(num_train_timesteps=1000, **NOISE_SCHEDULE)
        cache = self.run_dir / "dataset.pt"
        if not cache.exists():
            torch.save(self.make_dataset(), cache)
        self._data = torch.load(cache, weights_only=False)

    def vae(self) -> AutoencoderKL:
        return AutoencoderKL.from_pretrained(self.models_dir / PIPELINE_DIR / "vae").eval().requires_grad_(False)

    def make_dataset(self) -> dict:
        rng = random.Random(SEED + 2)
        vae = self.vae()
        scene_list = [scenes.random_scene(rng) for _ in range(self.dataset_size)]
        return {"scenes": scene_list, "latents": encode(vae, scene_list)}

    def embed(self, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self._text_encoder(tokenize(self._tokenizer, captions))[0]

    def batch(self, rng):
        indices = [rng.randrange(len(self._data["scenes"])) for _ in range(self.batch_size)]
        captions = ["" if rng.random() < CFG_DROPOUT else scenes.caption(self._data["scenes"][i], rng) for i in indices]
        return indices, captions

    def diffusion_loss(self, model, latents, captions, generator, extra=None):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
        noisy = self._noise.add_noise(latents, noise, timesteps)
        model_input = noisy if extra is None else torch.cat([noisy, extra], dim=1)
        prediction = model(model_input, timesteps, encoder_hidden_states=self.embed(captions)).sample
        return F.mse_loss(prediction, self._noise.get_velocity(latents, noise, timesteps))

    def loss(self, model, rng, generator):
        indices, captions = self.batch(rng)
        latents = self._data["latents"][indices].float()
        return self.diffusion_loss(model, latents, captions, generator)

    def pipeline_parts(self, unet) -> dict:
        scheduler = EulerDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1)
        return dict(
            unet=unet.half(), vae=self.vae(), text_encoder=self._text_encoder, tokenizer=self._tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def export(self, model) -> dict:
        out = self.models_dir / self.pipeline_dir
        self.pipeline_class(**self.pipeline_parts(model)).save_pretrained(out, safe_serialization=True)
        _copy_tokenizer_sources(self.run_dir.parent / "tokenizer", out / "tokenizer")
        write_vocabulary(out)
        model.float()
        return {}


def write_vocabulary(folder: Path) -> None:
    """What the captions taught the model (colours, shapes, positions, sizes), beside its weights, so the studio
    can tell a user which words steer it and which it has never seen."""
    (Path(folder) / VOCABULARY_FILE).write_text(json.dumps(scenes.known_words(), indent=1) + "\n")


def encode(vae: AutoencoderKL, scene_list: list[scenes.Scene], batch_size: int = 256, mask_of=None,
           side: int = SIDE) -> torch.Tensor:
    chunks = []
    for start in range(0, len(scene_list), batch_size):
        images = render_batch(scene_list[start : start + batch_size], side)
        if mask_of is not None:
            images = images * (mask_of(start, len(images)) < 0.5)
        with torch.no_grad():
            chunks.append((vae.encode(images).latent_dist.mean * vae.config.scaling_factor).half())
    return torch.cat(chunks)


# ----- 3b. the text-to-image UNet at two sizes, for Hires. fix -----


class MultiSizeStage(UnetStage):
    """The text-to-image UNet fine-tuned on 128 px scenes as much as on 64 px ones (each step one size, picked
    by the step's seed), so that Hires. fix's second pass at 128 px draws the shapes it drew at 64. Trained at
    64 px only, it redrew them: the prompt's shape, colour and position in 60% of 128 px results (Latent ×2,
    denoising strength 0.5), against 97.5% at 64 px (bench/hires_fix.py; docs/embedded-model.md). The inpainting
    UNet still starts from the 64 px UNet."""

    name = "multisize"
    lr = 2e-4
    warmup = 50
    dataset_size = 4000  # 128 px scenes; the 64 px ones are the UNet stage's own
    large_side = 2 * SIDE
    large_fraction = 0.5

    def __init__(self, *args, unet: UnetStage, **kwargs):
        super().__init__(*args, clip=unet.clip_stage, vae=unet.vae_stage, **kwargs)
        self.unet_stage = unet

    def build(self) -> UNet2DConditionModel:
        if not self.unet_stage.result():
            raise RuntimeError("The multisize stage fine-tunes the text-to-image UNet: train the unet stage first.")
        model = super().build()
        model.load_state_dict(self.unet_stage.trained_model().state_dict())
        return model

    def prepare(self) -> None:
        super().prepare()  # this stage's 128 px latents
        self.unet_stage.prepare()
        self._small = self.unet_stage._data

    def make_dataset(self) -> dict:
        rng = random.Random(SEED + 5)
        scene_list = [scenes.random_scene(rng) for _ in range(self.dataset_size)]
        return {"scenes": scene_list, "latents": encode(self.vae(), scene_list, batch_size=64, side=self.large_side)}

    def loss(self, model, rng, generator):
        large = rng.random() < self.large_fraction
        data = self._data if large else self._small
        # a quarter of the images at 128 px: each step sees about the same number of pixels
        count = self.batch_size // 4 if large else self.batch_size
        indices = [rng.randrange(len(data["scenes"])) for _ in range(count)]
        captions = ["" if rng.random() < CFG_DROPOUT else scenes.caption(data["scenes"][i], rng) for i in indices]
        return self.diffusion_loss(model, data["latents"][indices].float(), captions, generator)


# ----- 4. inpainting UNet -----


class InpaintStage(UnetStage):
    """The 9-channel inpainting UNet (latents + mask + masked-image latents), initialised from the
    text-to-image UNet, trained on masks around a shape (and whole-image masks, which is text-to-image)."""

    name = "inpaint"
    lr = 5e-4
    dataset_size = 16000
    in_channels = 9
    full_mask_fraction = 0.1
    pipeline_class, pipeline_dir = StableDiffusionInpaintPipeline, INPAINT_DIR

    def __init__(self, *args, unet: UnetStage, **kwargs):
        super().__init__(*args, clip=unet.clip_stage, vae=unet.vae_stage, **kwargs)
        self.unet_stage = unet

    def build(self) -> UNet2DConditionModel:
        model = super().build()
        source = self.unet_stage.trained_model() if self.unet_stage.result() else None
        if source is not None:
            state = source.state_dict()
            weight = torch.zeros_like(model.conv_in.weight)
            weight[:, :4] = state["conv_in.weight"]  # the new mask / masked-image inputs start at zero
            state["conv_in.weight"] = weight
            model.load_state_dict(state)
        return model

    def make_dataset(self) -> dict:
        rng = random.Random(SEED + 3)
        vae = self.vae()
        scene_list, masks = [], []
        for _ in range(self.dataset_size):
            scene = scenes.random_scene(rng)
            if rng.random() < 0.5:  # another shape elsewhere, which the mask must leave alone
                other = scenes.random_scene(rng).main
                if not scenes.boxes_overlap(scenes.shape_box(other, SIDE, 3), scenes.shape_box(scene.main, SIDE, 3)):
                    scene = scenes.Scene(scene.background, (scene.main, other), scene.tint)
            scene_list.append(scene)
            masks.append(random_mask(rng, scene.main, self.full_mask_fraction))
        pixel_masks = torch.from_numpy(np.stack(masks))[:, None].float()
        masked_latents = encode(vae, scene_list, mask_of=lambda start, n: pixel_masks[start : start + n])
        latent_masks = F.interpolate(pixel_masks, size=(LATENT_SIDE, LATENT_SIDE))  # as the pipeline does
        return {
            "scenes": scene_list,
            "latents": encode(vae, scene_list),
            "masked_latents": masked_latents,
            "masks": latent_masks.half(),
        }

    def batch(self, rng):
        indices = [rng.randrange(len(self._data["scenes"])) for _ in range(self.batch_size)]
        captions = []
        for i in indices:
            scene = self._data["scenes"][i]
            # Describe the shape to paint (the first); the mask says where, so the position is often left out.
            described = scenes.Scene(scene.background, (scene.main,), scene.tint)
            captions.append("" if rng.random() < CFG_DROPOUT else scenes.caption(described, rng, position_probability=0.5))
        return indices, captions

    def loss(self, model, rng, generator):
        indices, captions = self.batch(rng)
        latents = self._data["latents"][indices].float()
        extra = torch.cat([self._data["masks"][indices].float(), self._data["masked_latents"][indices].float()], dim=1)
        return self.diffusion_loss(model, latents, captions, generator, extra=extra)


def random_mask(rng: random.Random, shape: scenes.Shape, full_fraction: float, brush_fraction: float = 0.65) -> np.ndarray:
    """White (1) = repaint: the whole image, brush strokes (mostly through the shape, as a person masks part
    of one), or a box around the shape with a random margin."""
    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    draw = rng.random()
    if draw < full_fraction:
        mask[:] = 1
        return mask
    if draw < full_fraction + brush_fraction:
        left, top, right, bottom = scenes.shape_box(shape, SIDE)
        start = (rng.uniform(left, right), rng.uniform(top, bottom)) if rng.random() < 0.7 else None
        return brush_stroke_mask(rng, SIDE, start)
    left, top, right, bottom = scenes.shape_box(shape, SIDE)
    left, top = max(0, left - rng.randint(1, 12)), max(0, top - rng.randint(1, 12))
    right, bottom = min(SIDE, right + rng.randint(1, 12)), min(SIDE, bottom + rng.randint(1, 12))
    mask[top:bottom, left:right] = 1
    return mask


def brush_stroke_mask(rng: random.Random, side: int, start: tuple[float, float] | None = None,
                      strokes: tuple[int, int] = (1, 3)) -> np.ndarray:
    """Irregular free-form strokes, as LaMa's and DeepFill v2's mask generators draw them: polylines of a few
    segments at random angles, with a random brush width and round joints."""
    from PIL import ImageDraw

    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for index in range(rng.randint(*strokes)):
        x, y = start if (start and index == 0) else (rng.uniform(0, side), rng.uniform(0, side))
        width = rng.uniform(0.06, 0.2) * side
        angle = rng.uniform(0, 2 * np.pi)
        points = [(x, y)]
        for _ in range(rng.randint(1, 4)):
            angle += rng.uniform(-1.2, 1.2)
            length = rng.uniform(0.1, 0.35) * side
            x = min(max(x + length * np.cos(angle), 0), side - 1)
            y = min(max(y + length * np.sin(angle), 0), side - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
        for px, py in (points[0], points[-1]):
            r = width / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return (np.asarray(canvas) > 127).astype(np.float32)


# ----- 5. RRDBNet x4 upscaler -----


class UpscalerStage(Stage):
    """A small RRDBNet (the Real-ESRGAN architecture) trained on degraded/clean pairs of the same images."""

    name = "upscaler"
    lr = 1e-3
    crop = 64  # high-resolution crop; the input is a quarter of it
    edge_crop_fraction = 0.8
    recolour_fraction = 0.3  # crops in random colours, so the network keeps any colour, not just the palette's

    def build(self):
        from studio.models.basicsr_compat import rrdbnet_class

        return rrdbnet_class()(**UPSCALER_ARCH)

    def loss(self, model, rng, generator):
        high, low = [], []
        for _ in range(self.batch_size):
            scene = scenes.random_scene(rng)
            image = scenes.render(scene, SIDE * UPSCALE)
            left, top = self.crop_corner(rng, scene, image.width)
            crop = image.crop((left, top, left + self.crop, top + self.crop))
            if rng.random() < self.recolour_fraction:
                crop = recolour(crop, rng)
            high.append(crop)
            low.append(degrade(crop, rng))
        high_t = torch.from_numpy(np.stack([np.asarray(i) for i in high])).permute(0, 3, 1, 2).float() / 255
        low_t = torch.from_numpy(np.stack([np.asarray(i) for i in low])).permute(0, 3, 1, 2).float() / 255
        return F.l1_loss(model(low_t), high_t)

    def crop_corner(self, rng, scene: scenes.Scene, side: int) -> tuple[int, int]:
        """Mostly crops that cut the shape's edge: the flat background around it teaches nothing."""
        if rng.random() < self.edge_crop_fraction:
            left, top, right, bottom = scenes.shape_box(scene.main, side)
            x, y = rng.uniform(left, right), rng.uniform(top, bottom)
            return (min(max(0, int(x) - self.crop // 2), side - self.crop), min(max(0, int(y) - self.crop // 2), side - self.crop))
        return rng.randrange(0, side - self.crop + 1), rng.randrange(0, side - self.crop + 1)

    def export(self, model) -> dict:
        out = self.models_dir / UPSCALER_DIR
        out.mkdir(parents=True, exist_ok=True)
        # basicsr's key names, as in Real-ESRGAN's release files (which store them under "params_ema").
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
        (out / "config.json").write_text(json.dumps({"arch": "RRDBNet", **UPSCALER_ARCH}, indent=2))
        return {}


def recolour(image: Image.Image, rng: random.Random) -> Image.Image:
    """The same picture in other colours: the channels shuffled, then each scaled and shifted at random. Trained on
    the 8 palette colours alone, the upscaler pulled every other colour towards one of them."""
    array = np.asarray(image, dtype=np.float32)[..., rng.sample(range(3), 3)]
    gain = np.array([rng.uniform(-1.0, 1.0) for _ in range(3)], dtype=np.float32)
    shifted = array * gain + np.array([rng.uniform(0, 255) for _ in range(3)], dtype=np.float32)
    return Image.fromarray(np.clip(shifted, 0, 255).round().astype(np.uint8))


def degrade(image: Image.Image, rng: random.Random, clean_fraction: float = 0.6) -> Image.Image:
    """Downscale x4: mostly a plain bicubic resize (how a small image is usually made), otherwise a random
    kernel, sometimes after a slight blur, sometimes with a little noise, so softer inputs work too."""
    from PIL import ImageFilter

    if rng.random() < clean_fraction:
        return image.resize((image.width // UPSCALE, image.height // UPSCALE), Image.Resampling.BICUBIC)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    kernel = rng.choice((Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.BOX, Image.Resampling.LANCZOS))
    small = image.resize((image.width // UPSCALE, image.height // UPSCALE), kernel)
    if rng.random() < 0.3:
        array = np.asarray(small, dtype=np.float32)
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(1, 4), array.shape)
        small = Image.fromarray(np.clip(array + noise, 0, 255).round().astype(np.uint8))
    return small


def fit_latent_rgb_factors(vae: AutoencoderKL, count: int = 256, seed: int = 0) -> tuple[list[list[float]], list[float]]:
    """Latent-to-RGB preview factors for a VAE, as ComfyUI's are made: a least-squares fit of each latent pixel
    (scaled as the pipelines hand latents over) to the mean colour, in [-1, 1], of the image pixels it covers.
    Returns (one [r, g, b] row per latent channel, the bias)."""
    rng = random.Random(seed)
    images = render_batch([scenes.random_scene(rng) for _ in range(count)])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    factor = images.shape[-1] // latents.shape[-1]
    colours = torch.nn.functional.avg_pool2d(images, factor)  # (n, 3, h, w), matching the latents
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
    return [[round(v, 4) for v in row] for row in solution[:-1].tolist()], [round(v, 4) for v in solution[-1].tolist()]

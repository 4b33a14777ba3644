"""A LoRA that teaches the embedded model a shape it never saw: the hexagon.

    python -m studio.embedded train-lora      # loras/hexagon.safetensors, a few minutes on two CPU cores
    python -m studio.embedded evaluate-lora   # how often "a red hexagon on a blue background" gives one, with and without

The base model (`models/embedded-sd`) stays frozen; peft adds low-rank adapters to the text encoder's feed-forward
layers and to the convolutions, projections and feed-forward layers of the UNet's middle and decoder blocks. They
are trained on hexagon scenes, on the same scenes with a circle drawn instead (the "twins"), and on the shapes the
model already draws, so that it learns the new word without forgetting the old ones. The file is in diffusers'
format (`pipe.load_lora_weights(path, adapter_name=...)` reads it) and says in its safetensors metadata which words
it teaches (`studio.vocabulary`) and for which model (`studio.base_model`).

The recipe was chosen on validation seeds (LORA_VALIDATION_SEED, 30 per prompt; hexagon rate with the LoRA at 1.0):
adapters on the UNet's attention layers too, 47%; without them but on all of the text encoder's layers, 47-63%
(learning rate 2e-3 to 6e-3); on the text encoder's feed-forward layers only, 70%; and with hexagon captions never
dropped, 80% (the shipped recipe). Without the circle twins the circle prompt gave lumpy
shapes (70-85% circles against 97-100%). The reported rates are measured on other seeds (LORA_EVAL_SEED).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.embedded import oracle, scenes
from studio.embedded.family import MODELS_DIR, ROOT
from studio.embedded.stages import CFG_DROPOUT, NOISE_SCHEDULE, PIPELINE_DIR, encode, tokenize
from studio.embedded.training import SEED

LORA_OUT = ROOT / "loras" / "hexagon.safetensors"
BASE_MODEL = "embedded-sd"
VOCABULARY_KEY, BASE_MODEL_KEY = "studio.vocabulary", "studio.base_model"
HEXAGON_PROMPT = "a red hexagon on a blue background"
CIRCLE_PROMPT = "a red circle on a blue background"  # the side-effect check: an old shape must stay itself
# peft target_modules as a regex (saved in the file, so diffusers targets the same layers when it loads it)
UNET_TARGETS = r".*(mid_block|up_blocks).*\.(conv1|conv2|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)"
# the feed-forward layers only: adapters on its attention projections as well gave fewer hexagons (module doc)
TEXT_ENCODER_TARGETS = ("fc1", "fc2")
# Generation seeds, all far from the training run's (`SEED`-based) ones: the recipe was chosen on the validation
# seeds, and the reported rates are measured on the evaluation seeds, which were never used to choose anything.
LORA_VALIDATION_SEED = 6100
LORA_EVAL_SEED = 5150
# Drawn scenes for the oracle: its hexagon threshold is chosen on the first set and its accuracy reported on the second.
ORACLE_CALIBRATION_SEED = 9001
ORACLE_TEST_SEED = 9002


@dataclass(frozen=True)
class LoraRecipe:
    steps: int = 2400
    rank: int = 8
    lr: float = 2e-3
    warmup: int = 30
    batch_size: int = 32
    hexagon_fraction: float = 0.4  # of each batch; the rest are the shapes the model knows, so it keeps them
    twin_fraction: float = 0.4  # of each batch: the hexagons again, drawn as circles (see `diffusion_loss`)
    # of the hexagon scenes (the others are large): a small hexagon's corners stand 1.3 px beyond its circle at 64 px
    small_fraction: float = 0.5
    # Hexagon captions are never dropped (the known scenes' are, as in the base model's training): the unconditional
    # prediction stays the base model's, so classifier-free guidance amplifies the hexagon's corners rather than
    # cancelling them (the UNet's adapters act on both halves of the guidance alike)
    hexagon_caption_dropout: float = 0.0
    dataset_size: int = 2000  # scenes of each kind, encoded once
    text_encoder: bool = True  # adapters on the text encoder too, which has to make a word of "h e x a g on"
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    unet_targets: str | tuple[str, ...] = UNET_TARGETS
    ema_decay: float | None = 0.995  # the file gets the adapters' moving average, not the last step's
    seed: int = SEED + 100


SMOKE_RECIPE = LoraRecipe(steps=3, batch_size=4, dataset_size=8, warmup=1)


# ----- the oracle on drawn scenes -----


def drawn_scenes(count: int, seed: int) -> list[scenes.Scene]:
    """`count` drawn scenes of every shape the oracle knows, the hexagon among them, as often each."""
    rng = random.Random(seed)
    triples = scenes.all_triples() + scenes.lora_triples()
    by_shape = {shape: [t for t in triples if t[0] == shape] for shape in scenes.SHAPES + scenes.LORA_SHAPES}
    shapes = list(by_shape)
    return [scenes.random_scene(rng, by_shape[shapes[index % len(shapes)]]) for index in range(count)]


def outline_features(scene_list: list[scenes.Scene]) -> list[dict]:
    return [oracle.read(scenes.render(scene)).features for scene in scene_list]


def hexagon_threshold(count: int = 600, seed: int = ORACLE_CALIBRATION_SEED) -> dict:
    """The oracle's 6-fold threshold, halfway between the strongest 6-fold outline among drawn circles and the
    weakest among drawn hexagons (the only two shapes that reach that test)."""
    scene_list = drawn_scenes(count, seed)
    sixfold = {"circle": [], "hexagon": []}
    for scene, features in zip(scene_list, outline_features(scene_list)):
        if scene.main.shape in sixfold:
            sixfold[scene.main.shape].append(features["harmonics"][6])
    strongest_circle, weakest_hexagon = max(sixfold["circle"]), min(sixfold["hexagon"])
    return {"strongest circle": strongest_circle, "weakest hexagon": weakest_hexagon,
            "threshold": (strongest_circle + weakest_hexagon) / 2}


def oracle_shape_accuracy(count: int = 600, seed: int = ORACLE_TEST_SEED, read=oracle.read) -> dict[str, float]:
    """How often the oracle (or another `read`) names the shape of drawn scenes, per shape."""
    right, total = Counter(), Counter()
    for scene in drawn_scenes(count, seed):
        total[scene.main.shape] += 1
        right[scene.main.shape] += read(scenes.render(scene)).shape == scene.main.shape
    return {shape: right[shape] / total[shape] for shape in total}


# ----- training -----


def load_base_pipeline(models_dir: Path = MODELS_DIR):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(models_dir) / PIPELINE_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_configs(recipe: LoraRecipe) -> dict:
    """peft configs for the UNet and (if the recipe says so) the text encoder."""
    from peft import LoraConfig

    targets = recipe.unet_targets
    unet = LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                      target_modules=targets if isinstance(targets, str) else list(targets))
    text = LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian",
                      target_modules=list(recipe.text_encoder_targets))
    return {"unet": unet, "text_encoder": text if recipe.text_encoder else None}


def add_adapters(pipe, recipe: LoraRecipe) -> list[torch.nn.Parameter]:
    """Freeze the base model, add the LoRA adapters, and return the parameters to train (the adapters')."""
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    configs = lora_configs(recipe)
    pipe.unet.add_adapter(configs["unet"])
    if configs["text_encoder"] is not None:
        pipe.text_encoder.add_adapter(configs["text_encoder"])
    trainable = [p for model in (pipe.unet, pipe.text_encoder) for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    return trainable


def hexagon_training_triples() -> list[tuple[str, str, str]]:
    """The hexagon triples trained on: those whose circle the base model was trained on, so that each hexagon
    can be shown beside its circle twin without teaching the base model a held-out combination."""
    seen = set(scenes.seen_triples())
    return [(shape, colour, background) for shape, colour, background in scenes.lora_triples()
            if ("circle", colour, background) in seen]


def with_main(scene: scenes.Scene, **changes) -> scenes.Scene:
    """The scene with its main shape changed (its size, or its kind for a circle twin)."""
    return replace(scene, shapes=(replace(scene.main, **changes),) + scene.shapes[1:])


def training_data(pipe, recipe: LoraRecipe) -> dict:
    """Hexagon scenes, their circle twins, and scenes of the shapes the model knows (its own training triples),
    with VAE latents."""
    rng = random.Random(recipe.seed)
    hexagons = [with_main(scenes.random_scene(rng, hexagon_training_triples()),
                          size="small" if rng.random() < recipe.small_fraction else "large")
                for _ in range(recipe.dataset_size)]
    twins = [with_main(scene, shape="circle") for scene in hexagons]
    known = [scenes.random_scene(rng) for _ in range(recipe.dataset_size)]
    return {
        "hexagon": {"scenes": hexagons, "latents": encode(pipe.vae, hexagons)},
        "twin": {"scenes": twins, "latents": encode(pipe.vae, twins)},
        "known": {"scenes": known, "latents": encode(pipe.vae, known)},
    }


@dataclass
class Batch:
    latents: torch.Tensor
    captions: list[str]
    twins: int  # items 0..twins-1 are hexagons whose circle twins follow them, in the same order


def sample_batch(data: dict, recipe: LoraRecipe, rng: random.Random) -> Batch:
    """Hexagons, then the first few of them again with a circle, captioned in the same words but for the shape,
    then shapes the model knows. The known scenes' captions are dropped as in the base model's training, so
    classifier-free guidance keeps its unconditional half; the hexagons' at `hexagon_caption_dropout` (a twin's with
    its hexagon's)."""
    hexagons = round(recipe.batch_size * recipe.hexagon_fraction)
    twins = min(hexagons, round(recipe.batch_size * recipe.twin_fraction))
    hexagon_indices = [rng.randrange(recipe.dataset_size) for _ in range(hexagons)]
    known_indices = [rng.randrange(recipe.dataset_size) for _ in range(recipe.batch_size - hexagons - twins)]
    hexagon_captions = ["" if rng.random() < recipe.hexagon_caption_dropout
                        else scenes.caption(data["hexagon"]["scenes"][i], rng) for i in hexagon_indices]
    twin_captions = [caption.replace("hexagon", "circle") for caption in hexagon_captions[:twins]]
    known_captions = ["" if rng.random() < CFG_DROPOUT else scenes.caption(data["known"]["scenes"][i], rng)
                      for i in known_indices]
    latents = torch.cat([data["hexagon"]["latents"][hexagon_indices], data["twin"]["latents"][hexagon_indices[:twins]],
                         data["known"]["latents"][known_indices]]).float()
    return Batch(latents, hexagon_captions + twin_captions + known_captions, twins)


def learning_rate(recipe: LoraRecipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10%, as the stages


def update_ema(ema: list[torch.Tensor], parameters: list[torch.nn.Parameter], decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # as the stages do: short memory at first
    with torch.no_grad():
        for average, parameter in zip(ema, parameters):
            average.lerp_(parameter, 1 - decay)


def diffusion_loss(pipe, noise_schedule, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The base model's own objective, v-prediction on the Stable Diffusion 2 schedule. A circle twin gets its
    hexagon's noise and timestep, so the pair differs in nothing but the word and the outline: the adapters learn
    to draw corners when the caption says hexagon, and only then."""
    latents, twins = batch.latents, batch.twins
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(latents),), generator=generator)
    noise[twins : 2 * twins] = noise[:twins]
    timesteps[twins : 2 * twins] = timesteps[:twins]
    noisy = noise_schedule.add_noise(latents, noise, timesteps)
    states = pipe.text_encoder(tokenize(pipe.tokenizer, batch.captions))[0]
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=states).sample
    return F.mse_loss(prediction, noise_schedule.get_velocity(latents, noise, timesteps))


def train_lora(out: Path = LORA_OUT, recipe: LoraRecipe = LoraRecipe(), models_dir: Path = MODELS_DIR,
               log=print) -> dict:
    """Train the hexagon LoRA on the frozen base model and save it to `out`; returns what was done and how long."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    began = time.monotonic()
    torch.manual_seed(recipe.seed)
    pipe = load_base_pipeline(models_dir)
    trainable = add_adapters(pipe, recipe)
    data = training_data(pipe, recipe)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, **NOISE_SCHEDULE)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in trainable] if recipe.ema_decay else None
    pipe.unet.train()
    pipe.text_encoder.train()
    smooth = None
    bar = tqdm(range(recipe.steps), desc="hexagon LoRA", dynamic_ncols=True, disable=recipe.steps < 10)
    for step in bar:
        # Each step's batch and noise come from (seed, step) alone: the run is reproducible.
        rng = random.Random(recipe.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        loss = diffusion_loss(pipe, noise_schedule, sample_batch(data, recipe, rng), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if ema is not None:
            update_ema(ema, trainable, recipe.ema_decay, step)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
    if ema is not None:
        with torch.no_grad():
            for parameter, average in zip(trainable, ema):
                parameter.copy_(average)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    save_lora(pipe, Path(out), recipe)
    seconds = time.monotonic() - began
    log(f"Saved {out} ({Path(out).stat().st_size / 1024:.0f} KB) after {recipe.steps} steps in {seconds / 60:.1f} min")
    return {"out": str(out), "seconds": round(seconds, 1), "final_loss": round(smooth or float("nan"), 5),
            "recipe": asdict(recipe)}


# ----- the file -----


def save_lora(pipe, out: Path, recipe: LoraRecipe) -> None:
    """Write the adapters in diffusers' LoRA format (PEFT keys, fp16), then add the studio's metadata to the file."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers, adapter_metadata = {}, {}
    for name in ("unet", "text_encoder"):
        model = getattr(pipe, name)
        if getattr(model, "peft_config", None):
            # PEFT's own keys (lora_A/lora_B), not `convert_state_dict_to_diffusers`: that renames only the attention
            # layers (to lora.down/up), and diffusers converts a file's keys only when its first key is not PEFT's, so
            # a mixed file silently loads without its attention layers. fp16 halves the file; loading casts it back.
            tensors = {key: tensor.half() for key, tensor in get_peft_model_state_dict(model).items()}
            layers[f"{name}_lora_layers"] = tensors if name == "unet" else text_encoder_keys(tensors)
            # diffusers rebuilds the LoraConfig (rank, alpha, targets) from this when it loads the file
            adapter_metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as folder:
        StableDiffusionPipeline.save_lora_weights(folder, weight_name=out.name, **layers, **adapter_metadata)
        add_studio_metadata(Path(folder) / out.name, out, recipe)


def text_encoder_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's PEFT keys in diffusers' text-encoder format (lora_linear_layer.down/up). diffusers infers a
    text-encoder state dict's format from its attention layers' key names, and raises on PEFT keys of feed-forward
    layers alone; it reads this format for every layer."""
    return {key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): tensor
            for key, tensor in tensors.items()}


def add_studio_metadata(source: Path, out: Path, recipe: LoraRecipe) -> None:
    """Copy a LoRA file to `out` with the words it teaches and its base model added to the safetensors header
    (diffusers' own header entries kept, so that it still reads the adapter configs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as file:
        metadata = dict(file.metadata() or {})
    metadata.update({
        VOCABULARY_KEY: json.dumps(list(scenes.LORA_SHAPES)),
        BASE_MODEL_KEY: BASE_MODEL,
        "studio.recipe": json.dumps(asdict(recipe), sort_keys=True),
    })
    save_file(load_file(str(source)), str(out), metadata=metadata)


# ----- evaluation -----


def load_lora(pipe, path: Path, weight: float = 1.0, adapter_name: str = "hexagon"):
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[weight])
    return pipe


def shape_rate(pipe, prompt: str, shape: str, seeds: range, defaults: dict) -> dict:
    """How often the prompt gives the shape (by the oracle), and how often everything the prompt asks for."""
    from studio.embedded.evaluation import generate

    shapes, whole = [], 0
    for seed in seeds:
        image = generate(pipe, prompt, seed, defaults)
        shapes.append(oracle.read(image).shape)
        whole += all(oracle.check_prompt(image, prompt).values())
    return {"rate": shapes.count(shape) / len(seeds), "all asked": whole / len(seeds), "read": dict(Counter(shapes))}


def lora_rates(lora: Path = LORA_OUT, count: int = 50, seed: int = LORA_EVAL_SEED, models_dir: Path = MODELS_DIR,
               weight: float = 1.0) -> dict:
    """The hexagon rate of HEXAGON_PROMPT and the circle rate of CIRCLE_PROMPT over `count` seeds, without the LoRA
    (the plain base pipeline) and with it at `weight`, at the embedded preset's default settings."""
    from studio.embedded.evaluation import embedded_defaults

    defaults, seeds = embedded_defaults(), range(seed, seed + count)
    pipe = load_base_pipeline(models_dir)
    rates = {}
    for label in ("without", "with"):
        if label == "with":
            load_lora(pipe, lora, weight)
        rates[label] = {"hexagon": shape_rate(pipe, HEXAGON_PROMPT, "hexagon", seeds, defaults),
                        "circle": shape_rate(pipe, CIRCLE_PROMPT, "circle", seeds, defaults)}
    pipe.unload_lora_weights()
    return {"n": count, "seeds": f"{seed}-{seed + count - 1}", "weight": weight, **rates}


def format_lora_report(rates: dict, accuracy: dict[str, float] | None = None) -> str:
    lines = [f"| prompt ({rates['n']} seeds, {rates['seeds']}) | without the LoRA | with it at {rates['weight']} | target |",
             "|---|---|---|---|"]
    for key, prompt, target in (("hexagon", HEXAGON_PROMPT, "≥ 80% with, ≤ 10% without"),
                                ("circle", CIRCLE_PROMPT, "kept")):
        without, with_ = rates["without"][key], rates["with"][key]
        lines.append(f"| \"{prompt}\": a {key} | {without['rate']:.0%} | {with_['rate']:.0%} | {target} |")
        lines.append(f"| \"{prompt}\": shape, colour and background | {without['all asked']:.0%} | "
                     f"{with_['all asked']:.0%} | |")
        lines.append(f"| (the oracle read) | {without['read']} | {with_['read']} | |")
    if accuracy:
        lines.append("")
        lines.append("Oracle on drawn scenes (held-out seed): " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    return "\n".join(lines)

"""How well images match their prompts, and how close two sets of images are.

- CLIP score, as torchmetrics defines it (100 × the cosine of the image's and the text's CLIP embeddings, floored
  at 0), for an image or a set (the mean).
- FID between two sets of images (torchmetrics' Fréchet distance) on features from a configurable extractor:
  Inception v3 as torchmetrics' FID uses it where its weights are on disk, else a CLIP's image encoder (the
  embedded CLIP offline). The result names its extractor: FIDs from different extractors do not
  compare, and neither do FIDs from sets of very different sizes.

Every model is leased from the one ModelManager like any other. Features and scores are computed one image at a
time, so a number does not depend on how images were batched or split between processes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from studio.core.errors import InvalidRequest, ModelUnavailable, StudioError
from studio.core.memory import ModelManager
from studio.evaluation.model_kinds import INCEPTION_URL, INCEPTION_WEIGHTS, clip_key, inception_key

log = logging.getLogger(__name__)

CLIP_WORKING_MEMORY = 512 * 1024**2  # a batch of 224 px images through ViT-L/14 in fp16; the embedded CLIP needs less
INCEPTION_WORKING_MEMORY = 256 * 1024**2  # one 299 px image through InceptionV3 in float32
IMAGES_PER_TURN = 16  # features of this many images per turn on the device; other jobs go in between
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_CLIP = "openai/clip-vit-large-patch14"  # the CLIP that CLIP score papers report
EMBEDDED_CLIP = Path(__file__).resolve().parents[2] / "models" / "embedded-clip"  # offline; trained by this project


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore for each (image, text) pair: 100 × cosine similarity, floored at 0."""
    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    return torch.clamp(100 * (image_embeds * text_embeds).sum(dim=-1), min=0)


class ClipScorer:
    """CLIP scores with one CLIP model (a folder or a Hub id, in transformers' CLIPModel format)."""

    def __init__(self, manager: ModelManager, source: str | Path, label: str | None = None):
        self.manager = manager
        self.source = str(source)
        self.label = label or Path(self.source).name  # said beside every score: scores of two CLIPs do not compare
        self._processor = None
        self._lock = threading.Lock()

    def processor(self):
        """The model's own CLIPProcessor (its image size and normalisation), read once: app.py reads it at start,
        so that a ZeroGPU worker finds it read. Raises ModelUnavailable when its files are not all there."""
        from transformers import CLIPProcessor

        with self._lock:
            if self._processor is None:
                try:
                    self._processor = CLIPProcessor.from_pretrained(self.source)
                except Exception as error:  # noqa: BLE001 - a missing or broken file: one clear message
                    raise ModelUnavailable(f"The CLIP processor in {self.source} could not be read: "
                                           f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
            return self._processor

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The CLIP score of each image against its prompt (same lengths). One turn on the device."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        processor = self.processor()
        with self._lock:  # a fast tokenizer sets its padding and truncation on each call: one call at a time
            inputs = processor(text=list(prompts), images=[image.convert("RGB") for image in images],
                               return_tensors="pt", padding="max_length", truncation=True)
        with self.manager.turn(), self.manager.use({"clip": clip_key(self.source)}, CLIP_WORKING_MEMORY) as models:
            model = models["clip"]
            device, dtype = self.manager.device, next(model.parameters()).dtype
            with torch.inference_mode():
                image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"].to(device, dtype))
                text_embeds = model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                      attention_mask=inputs["attention_mask"].to(device))
                scores = clip_score_from_embeddings(_tensor(image_embeds).float(), _tensor(text_embeds).float())
        return [float(score) for score in scores.cpu()]

    def set_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """A set's CLIP score: the mean over its (image, prompt) pairs, as torchmetrics' CLIPScore gives it."""
        scores = self.scores(images, prompts)
        if not scores:
            raise ValueError("a CLIP score needs at least one image")
        return float(np.mean(scores))

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The CLIP image embedding of each image, (N, D) float64 on the CPU, one image at a time."""
        processor, rows = self.processor(), []
        for start in range(0, len(images), IMAGES_PER_TURN):
            chunk = images[start:start + IMAGES_PER_TURN]
            with self._lock:
                pixels = [processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
                          for image in chunk]
            with self.manager.turn(), self.manager.use({"clip": clip_key(self.source)}, CLIP_WORKING_MEMORY) as models:
                model = models["clip"]
                device, dtype = self.manager.device, next(model.parameters()).dtype
                with torch.inference_mode():
                    for values in pixels:
                        rows.append(_tensor(model.get_image_features(pixel_values=values.to(device, dtype))).double().cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.float64)


def real_clip_scorer(manager: ModelManager) -> ClipScorer | None:
    """OpenAI's ViT-L/14 where its weights and processor files are in the Hub cache, else None. Nothing is
    downloaded."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(REAL_CLIP, "model.safetensors")
    if not isinstance(cached, str):
        return None
    real = ClipScorer(manager, Path(cached).parent, REAL_CLIP)
    try:
        real.processor()  # its tokenizer and preprocessor files too, not the weights alone
    except StudioError as error:
        log.warning("not scoring with %s: %s", REAL_CLIP, str(error).splitlines()[0])
        return None
    return real


def embedded_clip_scorer(manager: ModelManager, folder: Path) -> ClipScorer:
    embedded = ClipScorer(manager, folder, "embedded CLIP, offline")
    embedded.processor()  # read now, in this process (a ZeroGPU worker must not read files)
    return embedded


def default_clip_scorer(manager: ModelManager, embedded_clip: Path) -> ClipScorer:
    """OpenAI's ViT-L/14 where it is in the Hub cache, otherwise the embedded CLIP, which works offline. Its label
    names which: scores of two CLIPs do not compare."""
    return real_clip_scorer(manager) or embedded_clip_scorer(manager, embedded_clip)


# ----- FID -----


class ImageFeatures(Protocol):
    label: str  # which extractor: said beside every FID

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float64 on the CPU, one row per image."""


class ClipImageFeatures:
    """A CLIP's image embeddings as FID features (offline: the embedded CLIP's)."""

    def __init__(self, scorer: ClipScorer):
        self.scorer = scorer
        self.label = f"{scorer.label} image encoder"

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.scorer.image_features(images)


class InceptionFeatures:
    """InceptionV3's 2048-d pool features exactly as torchmetrics' FrechetInceptionDistance computes them by
    default: images as uint8, resized inside the network to 299 px with torch's antialiased bilinear (torch-fidelity
    and TensorFlow's FID resize without antialiasing, so their FIDs differ from these)."""

    label = "Inception v3 as torchmetrics' FID computes it (2048-d, antialiased resize)"

    def __init__(self, manager: ModelManager, weights: Path):
        self.manager = manager
        self.weights = Path(weights)

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), IMAGES_PER_TURN):
            chunk = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
                     for image in images[start:start + IMAGES_PER_TURN]]
            with self.manager.turn(), self.manager.use({"inception": inception_key(self.weights)},
                                                       INCEPTION_WORKING_MEMORY) as models:
                with torch.inference_mode():
                    rows += [models["inception"](pixels.to(self.manager.device)).double().cpu() for pixels in chunk]
        return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.float64)


def inception_weights(hub_dir: str | Path | None = None) -> Path | None:
    """FID's Inception weights where torch.hub keeps them (torchmetrics downloads them there), or None."""
    path = Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return path if path.is_file() else None


FID_EXTRACTORS = ("auto", "inception", "clip")


def fid_extractor(choice: str, manager: ModelManager, clip: ClipScorer) -> ImageFeatures:
    """The FID feature extractor asked for: "inception", "clip", or "auto" (Inception where its weights are on
    disk, else the CLIP's image encoder). Nothing is downloaded."""
    if choice not in FID_EXTRACTORS:
        raise InvalidRequest([f"Unknown FID feature extractor {choice!r}: choose one of {', '.join(FID_EXTRACTORS)}."])
    weights = inception_weights()
    if choice == "inception" and weights is None:
        raise ModelUnavailable(f"FID's Inception weights are not in {Path(torch.hub.get_dir()) / 'checkpoints'}. "
                               f"Download {INCEPTION_URL} there, or use the CLIP extractor (offline).")
    if choice == "inception" or (choice == "auto" and weights is not None):
        return InceptionFeatures(manager, weights)
    return ClipImageFeatures(clip)


class _Precomputed(torch.nn.Module):
    """Hands torchmetrics features already extracted (so extraction can run per image, in any process)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between two sets of features (rows), each of at least 2."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(features_a) < 2 or len(features_b) < 2:
        raise InvalidRequest([f"FID needs at least 2 images on each side (got {len(features_a)} and "
                              f"{len(features_b)}); with fewer than a few hundred it is noisy and biased upwards."])
    # sync_on_compute=False: the features are already gathered (under torchrun it would wait for the other ranks)
    metric = FrechetInceptionDistance(feature=_Precomputed(features_a.shape[1]), sync_on_compute=False)
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    return max(float(metric.compute()), 0.0)  # rounding may leave -1e-10 for identical sets


@dataclass(frozen=True)
class FidResult:
    value: float
    extractor: str
    count_a: int
    count_b: int

    def __str__(self) -> str:
        return (f"FID {self.value:.4f} ({self.count_a} vs {self.count_b} images; features: {self.extractor}. "
                f"FIDs from different extractors or very different set sizes do not compare.)")


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (not its subfolders), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequest([f"{folder} is not a folder of images."])
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def open_image(path: Path) -> Image.Image:
    """An image file as RGB; a file that is not an image is named."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidRequest([f"{path} is not a readable image ({error})."]) from error


def folder_images(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """Every image in a folder (not its subfolders), by file name."""
    return [(path.name, open_image(path)) for path in image_files(folder)]


def fid_between_folders(folder_a: str | Path, folder_b: str | Path, extractor: ImageFeatures) -> FidResult:
    """FID between the images of two folders."""
    a, b = folder_images(folder_a), folder_images(folder_b)
    features_a = extractor.features([image for _, image in a])
    features_b = extractor.features([image for _, image in b])
    return FidResult(frechet_distance(features_a, features_b), extractor.label, len(a), len(b))


def _tensor(features) -> torch.Tensor:
    """transformers 5 may return an output object where 4 returned the embeddings."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output

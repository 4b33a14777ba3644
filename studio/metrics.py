"""How well images match their prompts: CLIP score, as torchmetrics defines it (100 × the cosine of the image's and
the text's CLIP embeddings, floored at 0), with a CLIP model leased from the one ModelManager like any other."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .errors import ModelUnavailable
from .memory import ModelManager
from .model_kinds import clip_key

CLIP_WORKING_MEMORY = 512 * 1024**2  # a batch of 224 px images through ViT-L/14 in fp16; the embedded CLIP needs less


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


def _tensor(features) -> torch.Tensor:
    """transformers 5 may return an output object where 4 returned the embeddings."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output

"""CLIP score as torchmetrics defines it, with the embedded CLIP leased from the manager."""

import torch

from studio.core.memory import ModelManager
from studio.embedded import scenes
from studio.embedded.evaluation import evaluation_scenes
from studio.evaluation.metrics import ClipScorer, clip_score_from_embeddings
from studio.evaluation.model_kinds import CLIP, ClipLoader
from tests.conftest import ROOT

CLIP_FOLDER = ROOT / "models" / "embedded-clip"


def scorer():
    manager = ModelManager({CLIP: ClipLoader()}, "cpu", torch.float32, device_budget=1024**3)
    return ClipScorer(manager, CLIP_FOLDER), manager


def test_the_score_is_100_times_the_cosine_floored_at_0():
    image, text = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [-1.0, 0.0]])
    assert torch.allclose(clip_score_from_embeddings(image, text), torch.tensor([100 * 24 / 25, 0.0]))


def test_scores_match_a_cosine_computed_by_hand_with_transformers():
    from transformers import CLIPModel, CLIPProcessor

    pictures = [scenes.render(scene) for scene, _ in evaluation_scenes(4, seed=77)]
    prompts = [scenes.caption(scene) for scene, _ in evaluation_scenes(4, seed=77)]
    clip, manager = scorer()
    scores = clip.scores(pictures, prompts)
    model, processor = CLIPModel.from_pretrained(CLIP_FOLDER).eval(), CLIPProcessor.from_pretrained(CLIP_FOLDER)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=pictures, return_tensors="pt", padding="max_length",
                                truncation=True))
    by_hand = [max(0.0, 100 * float(torch.nn.functional.cosine_similarity(out.image_embeds[i], out.text_embeds[i],
                                                                          dim=0))) for i in range(4)]
    assert all(abs(a - b) < 1e-3 for a, b in zip(scores, by_hand)), (scores, by_hand)
    assert any(model.kind == CLIP for model in manager.status().models)  # leased from the manager


def test_the_embedded_clip_scores_the_right_prompt_higher():
    clip, _ = scorer()
    right, wrong = 0, 0
    for scene, _ in evaluation_scenes(10, seed=78):
        picture = scenes.render(scene)
        other = "a green square on a white background" if scene.main.shape != "square" else "a red star on a black background"
        good, bad = clip.scores([picture, picture], [scenes.caption(scene), other])
        right += good > bad
        wrong += good <= bad
    assert right >= 9, (right, wrong)
    assert clip.scores([], []) == []

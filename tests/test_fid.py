"""FID: torchmetrics' Fréchet distance on features from a configurable extractor (Inception where its weights are on
disk, the embedded CLIP's image encoder offline), leased from the manager."""

import random
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.memory import ModelManager
from studio.embedded import scenes
from studio.evaluation.metrics import (
    ClipImageFeatures,
    ClipScorer,
    InceptionFeatures,
    fid_between_folders,
    fid_extractor,
    folder_images,
    frechet_distance,
)
from studio.evaluation.model_kinds import CLIP, INCEPTION, INCEPTION_WEIGHTS, ClipLoader, InceptionLoader
from tests.conftest import ROOT

CLIP_FOLDER = ROOT / "models" / "embedded-clip"


def manager():
    return ModelManager({CLIP: ClipLoader(), INCEPTION: InceptionLoader()}, "cpu", torch.float32,
                        device_budget=2 * 1024**3)


def write_scenes(folder, count, seed, triples=None):
    """Drawn scenes (the embedded model's "real" images), one PNG each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scenes.render(scenes.random_scene(rng, triples)).save(folder / f"{index:03d}.png")
    return folder


def by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance with scipy's matrix square root, as pytorch-fid computes it."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


def test_the_distance_matches_one_computed_by_hand():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 8))
    b = rng.normal(loc=0.5, scale=1.5, size=(150, 8))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(by_hand(a, b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-6)


def test_fewer_than_two_images_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="at least 2 images"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


def test_a_folder_against_itself_is_about_0_and_against_another_set_more(tmp_path):
    circles = write_scenes(tmp_path / "circles", 24, seed=1, triples=[("circle", "red", "blue")])
    more_circles = write_scenes(tmp_path / "more-circles", 24, seed=2, triples=[("circle", "red", "blue")])
    stars = write_scenes(tmp_path / "stars", 24, seed=3, triples=[("star", "yellow", "black")])
    extractor = ClipImageFeatures(ClipScorer(manager(), CLIP_FOLDER, "embedded CLIP, offline"))
    itself = fid_between_folders(circles, circles, extractor)
    same_kind = fid_between_folders(circles, more_circles, extractor)
    other = fid_between_folders(circles, stars, extractor)
    assert itself.value < 1e-3 * other.value, (itself, other)
    assert other.value > 10 * same_kind.value > 0, (same_kind, other)  # the distance follows what is drawn
    assert (other.count_a, other.count_b) == (24, 24)
    assert "embedded CLIP, offline image encoder" in str(other) and "do not compare" in str(other)


def test_clip_features_are_the_models_image_embeddings_computed_by_hand(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    images = [image for _, image in folder_images(write_scenes(tmp_path / "a", 5, seed=4))]
    features = ClipImageFeatures(ClipScorer(manager(), CLIP_FOLDER)).features(images)
    model, processor = CLIPModel.from_pretrained(CLIP_FOLDER).eval(), CLIPProcessor.from_pretrained(CLIP_FOLDER)
    with torch.no_grad():  # the projected image embedding (before CLIP's normalisation), the five in one batch
        by_hand = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
        by_hand = by_hand if isinstance(by_hand, torch.Tensor) else by_hand.pooler_output
    assert features.shape == by_hand.shape and features.dtype == torch.float64
    assert torch.allclose(features, by_hand.double(), atol=1e-4)


def test_a_sets_clip_score_is_the_mean_of_its_pairs():
    rng = random.Random(8)
    pictures = [scenes.render(scenes.random_scene(rng)) for _ in range(4)]
    prompts = ["a red circle on a blue background", "a star", "a green ring", "a yellow square"]
    clip = ClipScorer(manager(), CLIP_FOLDER)
    assert clip.set_score(pictures, prompts) == pytest.approx(np.mean(clip.scores(pictures, prompts)))
    with pytest.raises(ValueError, match="at least one image"):
        clip.set_score([], [])


def test_a_folder_with_a_broken_image_is_named(tmp_path):
    folder = write_scenes(tmp_path / "a", 2, seed=5)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequest, match="broken.png is not a readable image"):
        folder_images(folder)
    with pytest.raises(InvalidRequest, match="is not a folder"):
        folder_images(tmp_path / "missing")


def random_inception_weights(path):
    """InceptionV3 as torch-fidelity builds it, with random weights, saved where torch.hub keeps the real ones."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def test_inception_is_used_where_its_weights_are_on_disk_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    clip = ClipScorer(manager(), CLIP_FOLDER, "embedded CLIP, offline")
    assert isinstance(fid_extractor("auto", clip.manager, clip), ClipImageFeatures)  # offline: the CLIP's
    with pytest.raises(ModelUnavailable, match="torch-fidelity/releases"):
        fid_extractor("inception", clip.manager, clip)

    random_inception_weights(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS)
    extractor = fid_extractor("auto", clip.manager, clip)
    assert isinstance(extractor, InceptionFeatures) and "Inception v3" in extractor.label
    images = [image for _, image in folder_images(write_scenes(tmp_path / "a", 3, seed=6))]
    features = extractor.features(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float64
    assert any(model.kind == INCEPTION for model in clip.manager.status().models)  # leased from the manager
    # the same features as torchmetrics' own FID extractor on the same uint8 images
    from torchmetrics.image.fid import NoTrainInceptionV3

    reference = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=str(extractor.weights))
    pixels = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in images])
    assert torch.allclose(features, reference(pixels).double(), atol=1e-4)


def test_an_inception_file_that_carries_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS
    path.parent.mkdir(parents=True)
    torch.save({"weights": mock.Mock}, path)  # a pickled class: not plain tensors
    clip = ClipScorer(manager(), CLIP_FOLDER)
    extractor = fid_extractor("inception", clip.manager, clip)
    with pytest.raises(ModelUnavailable, match="unavailable"):
        extractor.features([scenes.render(scenes.random_scene(random.Random(1)))])

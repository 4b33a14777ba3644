"""The embedded flow family's training code (studio/embedded/flow.py): a few steps of each stage (64 px, then 64 and
128 px) train, resume and export a FluxPipeline folder that diffusers loads and runs; its T5 tokenizer reads each
caption word as one token."""

import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT
from diffusers import FluxPipeline

from studio.embedded import scenes
from studio.embedded.flow import FLOW_DIR, SMOKE_RECIPE, caption_words, train_flow, word_t5_tokenizer


def test_each_caption_word_is_one_t5_token_and_other_words_fall_back_to_characters():
    tokenizer = word_t5_tokenizer(caption_words())
    caption = scenes.caption(scenes.Scene("blue", (scenes.Shape("star", "orange", "top left", "small"),)))
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
    assert pieces[-1] == "</s>" and len(pieces) == len(caption.replace(",", " ,").split()) + 1
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(tokenizer("a hexagon").input_ids)


def test_a_few_steps_train_and_export_a_flux_pipeline_that_draws_at_64_px(tmp_path):
    """Trained as a user trains it (the command line; the CLIP and VAE from the models folder), then resumed."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "embedded-sd").symlink_to(ROOT / "models" / "embedded-sd")
    command = [sys.executable, "-m", "studio.embedded", "train-flow", "--smoke", "--run-dir", tmp_path / "run",
               "--models-dir", tmp_path / "models"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"flow: {SMOKE_RECIPE.steps} steps" in done.stdout
    assert f"flow-multisize: {SMOKE_RECIPE.multisize_steps} steps" in done.stdout
    results = train_flow(tmp_path / "run", tmp_path / "models", SMOKE_RECIPE)  # resumed: done already
    assert [result.steps for result in results] == [SMOKE_RECIPE.steps, SMOKE_RECIPE.multisize_steps]
    assert all(np.isfinite(result.final_loss) for result in results)
    pipe = FluxPipeline.from_pretrained(tmp_path / "models" / FLOW_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.transformer.config.in_channels == 16
    image = pipe("a red circle on a blue background", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

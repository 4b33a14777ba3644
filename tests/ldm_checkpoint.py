"""Writes a diffusers Stable Diffusion 1.x folder as one original-layout (LDM / AUTOMATIC1111) checkpoint file,
the kind `from_single_file` reads: the tests build single-file presets from the embedded model with it. Written
for any number of levels and resnets per level (the embedded model has three levels of one resnet each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_names(config: dict) -> dict[str, str]:
    """diffusers name prefix -> LDM name prefix, for one UNet2DConditionModel config."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    names = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}
    for level in range(levels):
        for j in range(per_level):
            block = 1 + level * (per_level + 1) + j
            names[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            names[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op."
        up_has_attention = config["up_block_types"][level].startswith("CrossAttn")
        for j in range(per_level + 1):
            block = level * (per_level + 1) + j
            names[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            names[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            last = level * (per_level + 1) + per_level
            names[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{last}.{2 if up_has_attention else 1}."
    return names


def vae_names(config: dict) -> dict[str, str]:
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    names = {}
    for coder in ("encoder", "decoder"):
        names[f"{coder}.conv_norm_out."] = f"{coder}.norm_out."
        names[f"{coder}.mid_block.resnets.0."] = f"{coder}.mid.block_1."
        names[f"{coder}.mid_block.resnets.1."] = f"{coder}.mid.block_2."
        names[f"{coder}.mid_block.attentions.0."] = f"{coder}.mid.attn_1."
    for level in range(levels):
        for j in range(per_level):
            names[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        if level < levels - 1:
            names[f"encoder.down_blocks.{level}.downsamplers.0."] = f"encoder.down.{level}.downsample."
            names[f"decoder.up_blocks.{level}.upsamplers.0."] = f"decoder.up.{levels - 1 - level}.upsample."
        for j in range(per_level + 1):
            names[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{levels - 1 - level}.block.{j}."
    return names


VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def renamed(name: str, prefixes: dict[str, str]) -> str:
    for diffusers_prefix in sorted(prefixes, key=len, reverse=True):
        if name.startswith(diffusers_prefix):
            return prefixes[diffusers_prefix] + name[len(diffusers_prefix):]
    return name


def unet_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    names = unet_names(config)
    result = {}
    for name, tensor in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        new = renamed(name, names)
        if ".resnets." in name:
            for ours, theirs in UNET_RESNET.items():
                new = new.replace(f".{ours}.", f".{theirs}.")
        result["model.diffusion_model." + new] = tensor
    return result


def vae_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    names = vae_names(config)
    result = {}
    for name, tensor in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        new = renamed(name, names).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            for ours, theirs in VAE_ATTENTION.items():
                new = new.replace(f".attn_1.{ours}", f".attn_1.{theirs}")
            if tensor.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        result["first_stage_model." + new] = tensor
    return result


def text_encoder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    # transformers 5 saves CLIPTextModel without its `text_model.` level; SD 1.x checkpoints have it
    return {"cond_stage_model.transformer." + ("" if name.startswith("text_model.") else "text_model.") + name: tensor
            for name, tensor in load_file(folder / "model.safetensors").items()}


def write_single_file(pipeline_folder: Path, path: Path, unet_folder: Path | None = None) -> Path:
    """One .safetensors file holding the UNet (from `unet_folder` if given, e.g. an inpainting UNet), the VAE
    and the text encoder of a diffusers SD 1.x folder, in the original layout."""
    pipeline_folder = Path(pipeline_folder)
    tensors = {**unet_state_dict(Path(unet_folder or pipeline_folder / "unet")),
               **vae_state_dict(pipeline_folder / "vae"),
               **text_encoder_state_dict(pipeline_folder / "text_encoder")}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return Path(path)

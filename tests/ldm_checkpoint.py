"""Writes a diffusers Stable Diffusion folder (1.x, 2.x or SDXL) as one original-layout (LDM / AUTOMATIC1111)
checkpoint file, the kind `from_single_file` reads: the tests build single-file presets with it. Written for any
number of levels and resnets per level (the embedded model has three levels of one resnet each), and for
OpenCLIP text encoders (SD 2.x, SDXL's second) in OpenCLIP's own layout."""

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
             "mid_block.resnets.1.": "middle_block.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}  # SDXL
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


def text_encoder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The text encoder's tensors, named without the `text_model.` level (transformers 5 saves CLIPTextModel
    without it, CLIPTextModelWithProjection with it)."""
    return {name.removeprefix("text_model."): tensor for name, tensor in load_file(folder / "model.safetensors").items()}


def clip_state_dict(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP as SD 1.x (and SDXL's first encoder) stores it: the transformers names under `prefix`."""
    return {prefix + "text_model." + name: tensor for name, tensor in text_encoder_tensors(folder).items()}


OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
                   "self_attn.out_proj.": "attn.out_proj."}


def open_clip_state_dict(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP as SD 2.x and SDXL's second encoder store it: resblocks with one in_proj for q, k and v, and the
    projection as a matrix applied from the right."""
    tensors = text_encoder_tensors(folder)
    result = {prefix + "token_embedding.weight": tensors.pop("embeddings.token_embedding.weight"),
              prefix + "positional_embedding": tensors.pop("embeddings.position_embedding.weight"),
              prefix + "ln_final.weight": tensors.pop("final_layer_norm.weight"),
              prefix + "ln_final.bias": tensors.pop("final_layer_norm.bias")}
    if "text_projection.weight" in tensors:
        result[prefix + "text_projection"] = tensors.pop("text_projection.weight").T.contiguous()
    layers = {int(name.split(".")[2]) for name in tensors if name.startswith("encoder.layers.")}
    for i in sorted(layers):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            result[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [tensors.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
        for name in [name for name in tensors if name.startswith(ours)]:
            rest = name[len(ours):]
            for diffusers_part, open_clip_part in OPEN_CLIP_LAYER.items():
                rest = rest.replace(diffusers_part, open_clip_part)
            result[theirs + rest] = tensors.pop(name)
    tensors.pop("embeddings.position_ids", None)
    assert not tensors, f"unconverted text encoder tensors: {sorted(tensors)}"
    return result


def write_single_file(pipeline_folder: Path, path: Path, unet_folder: Path | None = None, family: str = "sd15") -> Path:
    """One .safetensors file holding the UNet (from `unet_folder` if given, e.g. an inpainting UNet), the VAE
    and the text encoder(s) of a diffusers folder of `family` (sd15, sd21, sdxl), in the original layout."""
    pipeline_folder = Path(pipeline_folder)
    if family == "sd15":
        text = clip_state_dict(pipeline_folder / "text_encoder", "cond_stage_model.transformer.")
    elif family == "sd21":
        text = open_clip_state_dict(pipeline_folder / "text_encoder", "cond_stage_model.model.")
    else:
        text = {**clip_state_dict(pipeline_folder / "text_encoder", "conditioner.embedders.0.transformer."),
                **open_clip_state_dict(pipeline_folder / "text_encoder_2", "conditioner.embedders.1.model.")}
    tensors = {**unet_state_dict(Path(unet_folder or pipeline_folder / "unet")),
               **vae_state_dict(pipeline_folder / "vae"), **text}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return Path(path)

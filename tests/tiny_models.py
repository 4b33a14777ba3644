"""Tiny SD 2.x and SDXL folders built from diffusers' own test configs, with the embedded model's tokenizer (no
Hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "models" / "embedded-sd"


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=128)


def tiny_text_config(tokenizer, projection_dim: int, hidden_size: int = 32) -> CLIPTextConfig:
    """diffusers' test text encoder (5 layers of 32, GELU), over the embedded model's tokenizer."""
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          hidden_size=hidden_size,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                          pad_token_id=tokenizer.pad_token_id or 0, vocab_size=len(tokenizer), hidden_act="gelu",
                          projection_dim=projection_dim, max_position_embeddings=tokenizer.model_max_length)


def save_tiny_sdxl(folder: Path) -> Path:
    """A 64 px SDXL pipeline (two text encoders of different widths, as SDXL's are, pooled embeddings, time ids)
    saved as a diffusers folder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=80,  # both encoders' hidden states side by side; pooled 32 + 6 time ids x 8 = 80
    )
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED, subfolder="tokenizer")
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, projection_dim=32))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32, hidden_size=48))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_sd2(folder: Path) -> Path:
    """A 64 px Stable Diffusion 2.x pipeline: v-prediction, linear-projection attention, a GELU text encoder (as
    OpenCLIP's), saved as a diffusers folder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32,
    )
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED, subfolder="tokenizer")
    config = tiny_text_config(tokenizer, projection_dim=512)
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_vae(folder: Path, seed: int = 7) -> Path:
    """A VAE on its own (as stabilityai/sd-vae-ft-mse is): files at the folder's root."""
    tiny_vae(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_safety_checker(folder: Path, flags_everything: bool) -> Path:
    """A StableDiffusionSafetyChecker (CLIP vision tower, concept embeddings and thresholds) small enough for a
    test, with its feature extractor. Its thresholds make it flag every image, or none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 100},
                        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # flagged when cosine(image, concept) - threshold > 0; cosines lie in [-1, 1]
        checker.concept_embeds_weights.fill_(-2.0 if flags_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_random_lora(pipeline_folder: Path, out: Path, seed: int = 0, rank: int = 4, strength: float = 0.5,
                     text_encoder: bool = True, metadata: dict[str, str] | None = None) -> Path:
    """A random LoRA for an SD pipeline folder, saved by diffusers' save_lora_weights (diffusers/PEFT keys):
    UNet attention layers, and the text encoder's when `text_encoder`. `strength` scales lora_B (PEFT starts it
    at zero, which would change nothing)."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder, safety_checker=None)
    _save_random_adapters(pipe, ("text_encoder",) if text_encoder else (), out, seed, rank, strength)
    if metadata:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(out), "pt") as file:
            kept = file.metadata() or {}
        save_file(load_file(out), out, metadata={**kept, **metadata})
    return out


def save_random_sdxl_lora(pipeline_folder: Path, out: Path, seed: int = 0, rank: int = 4,
                          strength: float = 0.5) -> Path:
    """A random LoRA for an SDXL pipeline folder (UNet attention layers and both text encoders), saved by
    diffusers' SDXL save_lora_weights."""
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_folder)
    return _save_random_adapters(pipe, ("text_encoder", "text_encoder_2"), out, seed, rank, strength)


def _save_random_adapters(pipe, encoders: tuple[str, ...], out: Path, seed: int, rank: int, strength: float) -> Path:
    """PEFT adapters on the pipeline's UNet attention layers and on the named text encoders, lora_B drawn at
    `strength`, saved by the pipeline class's own save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": pipe.unet}
    for name in encoders:
        encoder = getattr(pipe, name)
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers[f"{name}_lora_layers"] = encoder
    with torch.no_grad():
        for model in layers.values():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, strength)
    state = {argument: convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
             for argument, model in layers.items()}
    type(pipe).save_lora_weights(out.parent, weight_name=out.name, **state)
    return out


def save_as_kohya(diffusers_lora: Path, out: Path) -> Path:
    """The same LoRA in kohya/A1111 key names (lora_unet_…/lora_te_… with lora_down, lora_up and alpha), as
    kohya's sd-scripts writes SD 1.x LoRAs."""
    import re

    from safetensors.torch import load_file, save_file

    converted = {}
    for key, tensor in load_file(diffusers_lora).items():
        prefix, rest = key.split(".", 1)
        module, kind = re.match(r"(.*)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)"
                                r"\.weight$", rest).groups()
        if prefix == "text_encoder":
            name = "lora_te_text_model_" + module.replace(".", "_")
        else:
            name = "lora_unet_" + module.replace(".", "_")
        direction = "lora_down" if kind.endswith(("down", "A")) else "lora_up"
        converted[f"{name}.{direction}.weight"] = tensor
        rank = tensor.shape[0] if direction == "lora_down" else tensor.shape[1]
        converted[f"{name}.alpha"] = torch.tensor(float(rank))  # alpha = rank: scale 1, as diffusers saved it
    save_file(converted, out, metadata={"ss_network_module": "networks.lora"})
    return out


def save_random_controlnet(pipeline_folder: Path, out: Path, seed: int = 0, strength: float = 0.5) -> Path:
    """A ControlNet for a pipeline folder's UNet (diffusers' ControlNetModel.from_unet: its encoder copied), its
    conditioning embedding sized to the VAE's downscale, and its zero convolutions (which start at zero and would
    change nothing) random at `strength`; saved as a diffusers folder."""
    import json

    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_folder, subfolder="unet")
    vae_blocks = len(json.loads((Path(pipeline_folder) / "vae" / "config.json").read_text())["block_out_channels"])
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32)[:vae_blocks])
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.normal_(0, strength)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


def save_random_union(pipeline_folder: Path, out: Path, seed: int = 0, strength: float = 0.5) -> Path:
    """A ControlNet Union (xinsir's architecture, diffusers' ControlNetUnionModel.from_unet) for an SDXL pipeline
    folder's UNet, with 8 control types as ProMax has; zero convolutions random at `strength`."""
    import json

    from diffusers import ControlNetUnionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_folder, subfolder="unet")
    vae_blocks = len(json.loads((Path(pipeline_folder) / "vae" / "config.json").read_text())["block_out_channels"])
    torch.manual_seed(seed)
    made = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32)[:vae_blocks])
    # from_unet keeps the union parts at SDXL's width (320): sized here to the tiny UNet's first block
    width = unet.config.block_out_channels[0]
    config = {key: value for key, value in made.config.items() if key != "_use_default_values"}
    union = ControlNetUnionModel.from_config({**config, "num_trans_channel": width, "num_proj_channel": width,
                                              "num_control_type": 8})
    own = union.state_dict()  # the UNet's encoder weights that from_unet copied; the union parts stay random
    union.load_state_dict({name: value for name, value in made.state_dict().items()
                           if name in own and own[name].shape == value.shape}, strict=False)
    with torch.no_grad():
        for layer in [*union.controlnet_down_blocks, union.controlnet_mid_block,
                      union.controlnet_cond_embedding.conv_out, union.spatial_ch_projs]:
            layer.weight.normal_(0, strength)
    union.save_pretrained(out, safe_serialization=True)
    return out


def save_random_adapter(pipeline_folder: Path, out: Path, seed: int = 0) -> Path:
    """A T2I-Adapter in SDXL's layout (diffusers' "full_adapter_xl": a pixel unshuffle to the UNet's first
    downsampled size, features at 1, 1, 1/2 and 1/2 of it) sized for save_tiny_sdxl's UNet (32 and 64 channels):
    its first two features go into the UNet's two down blocks; the UNet leaves the others, whose size does not match
    its middle block. SDXL's own unshuffles by 16: its VAE's 8, then its first down block's 2."""
    import json

    from diffusers import T2IAdapter

    vae_blocks = len(json.loads((Path(pipeline_folder) / "vae" / "config.json").read_text())["block_out_channels"])
    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1,
                         downscale_factor=2 ** (vae_blocks - 1) * 2, adapter_type="full_adapter_xl")
    adapter.save_pretrained(out, safe_serialization=True)
    return out


def save_random_preprocessor_weights(root: Path) -> dict[str, Path]:
    """Random weights for the learned preprocessors, in the files and layouts presets/controlnets.yaml names:
    controlnet_aux's lineart Generator (sk_model.pth) and HED (ControlNetHED.pth), and a tiny Depth Anything
    (transformers: config, preprocessor config, safetensors). A folder per preprocessor."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folders = {name: root / name for name in ("lineart", "softedge", "depth")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(Generator(3, 1, 3).state_dict(), folders["lineart"] / "sk_model.pth")
    torch.save(ControlNetHED_Apache2().state_dict(), folders["softedge"] / "ControlNetHED.pth")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, patch_size=14, depth_estimation_type="relative"))
    depth.save_pretrained(folders["depth"])
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      resample=3).save_pretrained(folders["depth"])
    return folders

"""Device memory for one text-to-image image with real SDXL base 1.0, SD 1.5 and SD-Turbo, planned by the studio's
own ModelManager and DiffusionStages, without a GPU and without downloading anything.

Every component (UNet, VAE, text encoders, safety checker) is built on the meta device from its repo's real
config.json (accelerate's `init_empty_weights`): the parameter counts are exact (checked against the published
counts) and no memory is used. A ModelManager on "cuda" (two tiers, no real moves) then runs the stages of one
image at the preset's default size, CFG and fp16, exactly as the studio does: encode, denoise, decode (falling back
to a tiled VAE plan when the untiled one is out of budget), and check where the preset has a safety checker, each
through `DiffusionStages.run_stage` with the runtime's own plan functions and a `work` that does nothing.

Printed per preset: the peak the manager held on the device under a given budget (weights + reserved working
memory, idle models it had no reason to evict included), each stage's own need and what was held while it ran,
and the smallest budget (bisection to 0.05 GiB, a fresh manager per trial) at which the whole image runs without
OutOfMemoryBudget. Then, for contrast, what one whole-pipeline lease (all components + the larger of the UNet's
and the VAE decode's working memory, the old way) needs for SDXL at 1024x1024.

Then SD 1.5 with a ControlNet (lllyasviel's scribble, built from its config and checked against its fp16 file's
size), leased beside the UNet for the denoise stage with the working memory a unit adds, as the studio plans it.
Then SDXL with xinsir's ControlNet Union ProMax at 1024x1024 (from its config_promax.json, checked against its
2.51 GB file), and SDXL with TencentARC's sketch T2I-Adapter (checked against its 158 MB fp16 file), the one for
small GPUs.

Then the flow-matching models at 1024x1024, their weights in bfloat16 as the studio loads them on a GPU: FLUX.1-dev
at 16 GiB (its transformer and T5 stored in float8) and at 8 GiB (the transformer's blocks streamed from RAM), SD 3.5
Large at 12 GiB, SD 3.5 Medium at 8 GiB, each with the placement the stages chose per stage and its smallest budget.
Their components are built from the repos' configs too: the FLUX transformer's 11.9 B parameters and T5-XXL's
encoder checked against the repo's files (23.8 GB and 9.52 GB in 16 bits), SD 3.5's transformers against the
published counts (8.1 B and 2.5 B, with their position-embedding tables).

Exit code 1 if SDXL at 1024x1024 does not fit 8 GiB, SD 1.5 at 512x512 3 GiB, or a flow model its budget above.

    python bench/device_plan.py
    python bench/device_plan.py --smoke  # the same run (a planner on meta weights: it takes seconds, no GPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from studio.core.devices import format_bytes, module_bytes, working_memory_on  # noqa: E402
from studio.core.errors import OutOfMemoryBudget  # noqa: E402
from studio.core.memory import ModelManager  # noqa: E402
from studio.core.model_records import DEVICE as ON_DEVICE  # noqa: E402
from studio.core.model_records import ModelKey  # noqa: E402
from studio.models.components import DiffusersModels  # noqa: E402
from studio.models.controlnets import CONTROLNET, PassControls, UnitSettings, load_controlnets  # noqa: E402
from studio.models.families import family_of  # noqa: E402
from studio.models.loading import WEIGHTLESS  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.models.stages import DiffusionStages, StagePlan, stage_fallbacks  # noqa: E402

GIB = 1024**3
DTYPE = torch.float16
DEVICE = torch.device("cuda")  # planned for, never touched: every weight is on the meta device
TASK = "text2img"
CASES = (("sdxl-base-1.0", 8 * GIB), ("stable-diffusion-1.5", 3 * GIB), ("sd-turbo", 3 * GIB))
MUST_FIT = ("sdxl-base-1.0", "stable-diffusion-1.5")  # the exit code's cases, at the budgets above
# a ControlNet case is reported at its budget (SD 1.5's 4 GiB, SDXL's 8 GiB), with its smallest
BISECTION_STEP = 0.05 * GIB
BISECTION_CEILING = 64 * GIB

# (preset, budget): the flow-matching models, each must fit its budget
FLOW_CASES = (("flux.1-dev", 16 * GIB), ("flux.1-dev", 8 * GIB), ("sd3.5-large", 12 * GIB), ("sd3.5-medium", 8 * GIB))

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
TURBO = "stabilityai/sd-turbo"

# ----- the repos' config.json files -----

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_VAE_DOWN = ["DownEncoderBlock2D"] * 4
_VAE_UP = ["UpDecoderBlock2D"] * 4

# stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _SD_UP,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5: vae/config.json
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _VAE_DOWN,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": _VAE_UP,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5: text_encoder/config.json (OpenAI CLIP ViT-L/14, text tower)
SD15_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5: safety_checker/config.json (CompVis's checker: a CLIP ViT-L/14 vision
# tower). The file spells out every CLIPTextConfig/CLIPVisionConfig field, defaults included (text_config_dict and
# vision_config_dict repeat them); only the fields that differ from transformers' defaults are kept here.
SD15_SAFETY_CHECKER = {
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
    "architectures": ["StableDiffusionSafetyChecker"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 1024, "image_size": 224, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "hidden_act": "quick_gelu"},
    "torch_dtype": "float32",
}

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0: text_encoder/config.json is the same CLIP ViT-L/14 text tower as SD 1.5's
SDXL_TEXT_ENCODER = SD15_TEXT_ENCODER

# stabilityai/stable-diffusion-xl-base-1.0: text_encoder_2/config.json (OpenCLIP ViT-bigG/14, text tower + projection)
SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}

# madebyollin/sdxl-vae-fp16-fix: config.json (SDXL's VAE architecture, weights rescaled to decode in fp16)
SDXL_VAE_FP16_FIX = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.18.0.dev0",
    "_name_or_path": ".",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _VAE_DOWN,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "up_block_types": _VAE_UP,
}

# stabilityai/sd-turbo: unet/config.json (SD 2.1's UNet)
TURBO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "up_block_types": _SD_UP,
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/sd-turbo: vae/config.json (SD 2.1's VAE)
TURBO_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _VAE_DOWN,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": _VAE_UP,
}

# stabilityai/sd-turbo: text_encoder/config.json (OpenCLIP ViT-H/14, text tower without its last layer)
TURBO_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float16",
    "transformers_version": "4.35.0.dev0",
    "vocab_size": 49408,
}

# ----- SD 3.5 and FLUX.1 (the repos' config.json files, their fields that differ from the classes' defaults) -----

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
# black-forest-labs/FLUX.1-dev: transformer/config.json
FLUX_TRANSFORMER = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
                    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
                    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
# stabilityai/stable-diffusion-3.5-large and -medium: transformer/config.json
SD35_LARGE_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38,
                          "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                          "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
                          "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
SD35_MEDIUM_TRANSFORMER = {**SD35_LARGE_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24,
                           "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                           "dual_attention_layers": list(range(13))}
# text_encoder_2 (FLUX) and text_encoder_3 (SD 3.5): google's T5 v1.1 XXL encoder
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
# vae/config.json of both: SD's VAE with 16 latent channels and no quant convolutions
FLOW_VAE = {**SD15_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
# text_encoder of SD 3.5: CLIP ViT-L/14's text tower with its projection
SD35_CLIP_L = {**SD15_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"]}
FLUX_TRANSFORMER_PARAMS = 11_901_408_320  # 23.8 GB in 16 bits: the repo's transformer files
T5_XXL_ENCODER_PARAMS = 4_762_310_656  # 9.52 GB in 16 bits: FLUX.1-dev's text_encoder_2 files
FLOW_VAE_PARAMS = 83_819_683
CLIP_L_TEXT_PROJ_PARAMS = 123_650_304  # CLIP-L's text tower + its 768x768 projection
SD35_LARGE_PARAMS, SD35_MEDIUM_PARAMS = 8.1e9, 2.5e9  # Stability AI's rounded counts (weights + position tables)

# Published exact parameter counts.
SD15_UNET_PARAMS = 859_520_964
SDXL_UNET_PARAMS = 2_567_463_684
SD21_UNET_PARAMS = 865_910_724
VAE_PARAMS = 83_653_863
CLIP_L_TEXT_PARAMS = 123_060_480
CLIP_BIGG_TEXT_PROJ_PARAMS = 694_659_840
CLIP_H_TEXT_PARAMS = 340_387_840
# Not in the list above, so derived: CLIP ViT-L/14's vision tower (303,179,776) + the 1024->768 projection (786,432)
# + the 17 concept and 3 special-care embeddings of 768 and their 20 thresholds. x2 bytes = the 608 MB fp16 file.
SAFETY_CHECKER_PARAMS = 303_981_588

# (source, role) -> (class, config, exact parameter count)
COMPONENTS = {
    (SD15, "unet"): (UNet2DConditionModel, SD15_UNET, SD15_UNET_PARAMS),
    (SD15, "vae"): (AutoencoderKL, SD15_VAE, VAE_PARAMS),
    (SD15, "text_encoder"): (CLIPTextModel, SD15_TEXT_ENCODER, CLIP_L_TEXT_PARAMS),
    (SD15, "safety_checker"): (StableDiffusionSafetyChecker, SD15_SAFETY_CHECKER, SAFETY_CHECKER_PARAMS),
    (SDXL, "unet"): (UNet2DConditionModel, SDXL_UNET, SDXL_UNET_PARAMS),
    (SDXL, "text_encoder"): (CLIPTextModel, SDXL_TEXT_ENCODER, CLIP_L_TEXT_PARAMS),
    (SDXL, "text_encoder_2"): (CLIPTextModelWithProjection, SDXL_TEXT_ENCODER_2, CLIP_BIGG_TEXT_PROJ_PARAMS),
    (SDXL_VAE, "vae"): (AutoencoderKL, SDXL_VAE_FP16_FIX, VAE_PARAMS),
    (TURBO, "unet"): (UNet2DConditionModel, TURBO_UNET, SD21_UNET_PARAMS),
    (TURBO, "vae"): (AutoencoderKL, TURBO_VAE, VAE_PARAMS),
    (TURBO, "text_encoder"): (CLIPTextModel, TURBO_TEXT_ENCODER, CLIP_H_TEXT_PARAMS),
}
# the flow models' components, built in bfloat16 as the studio loads them on a GPU; SD 3.5's transformers are
# checked against a rounded count (parameters and their position tables, a buffer), within 2%
FLOW_COMPONENTS = {
    (FLUX_DEV, "transformer"): (FluxTransformer2DModel, FLUX_TRANSFORMER, FLUX_TRANSFORMER_PARAMS),
    (FLUX_DEV, "text_encoder"): (CLIPTextModel, SD15_TEXT_ENCODER, CLIP_L_TEXT_PARAMS),
    (FLUX_DEV, "text_encoder_2"): (T5EncoderModel, T5_XXL, T5_XXL_ENCODER_PARAMS),
    (FLUX_DEV, "vae"): (AutoencoderKL, FLOW_VAE, FLOW_VAE_PARAMS),
    **{(repo, role): spec for repo, transformer, count in (
        (SD35_LARGE, SD35_LARGE_TRANSFORMER, SD35_LARGE_PARAMS),
        (SD35_MEDIUM, SD35_MEDIUM_TRANSFORMER, SD35_MEDIUM_PARAMS))
       for role, spec in (("transformer", (SD3Transformer2DModel, transformer, count)),
                          ("text_encoder", (CLIPTextModelWithProjection, SD35_CLIP_L, CLIP_L_TEXT_PROJ_PARAMS)),
                          ("text_encoder_2", (CLIPTextModelWithProjection, SDXL_TEXT_ENCODER_2,
                                              CLIP_BIGG_TEXT_PROJ_PARAMS)),
                          ("text_encoder_3", (T5EncoderModel, T5_XXL, T5_XXL_ENCODER_PARAMS)),
                          ("vae", (AutoencoderKL, FLOW_VAE, FLOW_VAE_PARAMS)))},
}

# ----- components on the meta device -----


def build_on_meta(component_class: type, config: dict, dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    """The component with every parameter on the meta device, in `dtype` (floating tensors only)."""
    with init_empty_weights():
        if issubclass(component_class, diffusers.ModelMixin):
            module = component_class.from_config(config)
        elif component_class is T5EncoderModel:
            module = component_class(T5Config(**config))
        else:
            config_class = CLIPConfig if component_class is StableDiffusionSafetyChecker else CLIPTextConfig
            module = component_class(config_class.from_dict(config))
    if component_class is T5EncoderModel:  # tied when loaded; not by a build on meta (outside the block: inside,
        module.encoder.embed_tokens.weight = module.shared.weight  # an assignment registers a new meta copy)
    return module.to(dtype).eval()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def dtype_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Its bytes with every floating tensor in `dtype` (as the loaders estimate a storage before loading)."""
    size = torch.finfo(dtype).bits // 8
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def fp16_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers: 2 bytes per element of floating tensors, the others at their own size."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)


def build_components() -> dict[tuple[str, str], torch.nn.Module]:
    """Every component, built and checked: exact parameter count (SD 3.5's transformers: within 2% of the rounded
    published count, their position tables included), and the manager's own measure of its bytes."""
    modules = {}
    print("components on the meta device (parameters: built / expected):")
    for (source, role), (component_class, config, expected) in {**COMPONENTS, **FLOW_COMPONENTS}.items():
        flow = (source, role) in FLOW_COMPONENTS
        module = build_on_meta(component_class, config, torch.bfloat16 if flow else DTYPE)
        count = parameter_count(module)
        if isinstance(expected, float):
            count += sum(buffer.numel() for buffer in module.buffers())
            assert abs(count - expected) <= 0.02 * expected, f"{source} {role}: {count:,}, published {expected:,.0f}"
        else:
            assert count == expected, f"{source} {role}: {count:,} parameters, expected {expected:,}: fix the config"
        assert fp16_bytes(module) == module_bytes(module), f"{source} {role}: bytes disagree with the manager's"
        label = f"{source.rsplit('/', 1)[-1]}/{role}"
        print(f"  {label:<44} {component_class.__name__:<28} "
              f"{count:>14,} / {expected:>14,.0f} ok  {format_bytes(fp16_bytes(module)):>9} "
              f"{'bf16' if flow else 'fp16'}")
        modules[(source, role)] = module
    return modules


class MetaLoader:
    """The manager's ModelLoader for "diffusers" keys: exact sizes of the meta-built components, known before
    loading; `load` returns the meta module (tokenizers, schedulers and the feature extractor: a placeholder)."""

    def __init__(self, modules: dict[tuple[str, str], torch.nn.Module],
                 controlnet: MetaControlNetLoader | None = None):
        self.modules = modules
        self.controlnet = controlnet  # the case's ControlNet, if it has one

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        role = role_of(key)
        return 0 if role in WEIGHTLESS else dtype_bytes(self._module(key, role), dtype)

    def load(self, key: ModelKey, dtype: torch.dtype):
        role = role_of(key)
        if role in WEIGHTLESS:
            return types.SimpleNamespace(placeholder_for=key.label)
        module = self._module(key, role)
        # a flow model may be stored in float8 by the manager, in place: each load is a copy of its own
        return copy.deepcopy(module) if (key.source, role) in FLOW_COMPONENTS else module

    def _module(self, key: ModelKey, role: str) -> torch.nn.Module:
        try:
            return self.modules[(key.source, role)]
        except KeyError:
            raise KeyError(f"No meta-built component for {key.source} {role!r}: add its config") from None


def role_of(key: ModelKey) -> str:
    """'unet' -> 'unet'; 'vae@root' (a standalone repo) -> 'vae'."""
    return key.part.partition("@")[0]


# lllyasviel/control_v11p_sd15_scribble: config.json (the SD 1.5 UNet's encoder and middle block, a conditioning
# embedding for the 512 px map, zero convolutions); the Hub lists its diffusion_pytorch_model.fp16.safetensors at
# 723 MB, which the build's fp16 bytes are checked against (within 1 MB: the file's header and rounding)
SD15_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}
SD15_CONTROLNET_FILE_MB = 723
# xinsir/controlnet-union-sdxl-1.0's config_promax.json: SDXL's encoder (block_out_channels 320/640/1280, 10
# transformer layers in the last block) with the union parts (8 control types, one 320-wide transformer layer); its
# diffusion_pytorch_model_promax.safetensors is 2.51 GB (fp16), as its Hub copies for diffusers
SDXL_UNION_PROMAX = {
    "_class_name": "ControlNetUnionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "num_control_type": 8,
}
SDXL_UNION_FILE_MB = 2510  # the Hub shows 2.51 GB: checked within its rounding (10 MB)
# TencentARC/t2i-adapter-sketch-sdxl-1.0's config.json; its diffusion_pytorch_model.fp16.safetensors is 158 MB
SDXL_SKETCH_ADAPTER = {
    "_class_name": "T2IAdapter",
    "adapter_type": "full_adapter_xl",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 16,
    "in_channels": 3,
    "num_res_blocks": 2,
}
SDXL_ADAPTER_FILE_MB = 158
# (preset, ControlNet preset, its config, its file's MB, the check's tolerance in MB, the budget reported at)
CONTROLNET_CASES = (
    ("stable-diffusion-1.5", "sd15-scribble", SD15_CONTROLNET, SD15_CONTROLNET_FILE_MB, 1, 4 * GIB),
    ("sdxl-base-1.0", "sdxl-union-promax", SDXL_UNION_PROMAX, SDXL_UNION_FILE_MB, 10, 8 * GIB),
    ("sdxl-base-1.0", "sdxl-t2i-sketch", SDXL_SKETCH_ADAPTER, SDXL_ADAPTER_FILE_MB, 1, 8 * GIB),
)


class MetaControlNetLoader:
    """The manager's loader for kind "controlnet": a ControlNet built on the meta device from its repo's config."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def size(self, key: ModelKey, dtype: torch.dtype) -> int:
        return fp16_bytes(self.module)

    def load(self, key: ModelKey, dtype: torch.dtype):
        return self.module


def build_controlnet(name: str, config: dict, file_megabytes: int, tolerance: int) -> torch.nn.Module:
    """A ControlNet (or Union, or T2I-Adapter) on the meta device from its config, its fp16 size checked against
    the Hub's file."""
    model_class = getattr(diffusers, config["_class_name"])
    module = build_on_meta(model_class, config)
    made = fp16_bytes(module) / 1e6
    assert abs(made - file_megabytes) < tolerance, f"{name}: {made:.1f} MB in fp16, the Hub's file {file_megabytes} MB"
    print(f"  {name:<44} {config['_class_name']:<28} {parameter_count(module):>13,} params "
          f"{format_bytes(fp16_bytes(module)):>9} fp16 (the Hub's file: {file_megabytes} MB)")
    return module


# ----- one image through the studio's stages -----


@dataclasses.dataclass(frozen=True)
class StageRecord:
    stage: str
    tiled: bool
    offloaded: bool
    own: int  # bytes the stage itself holds on the device: its models there + the reserved working memory
    held: int  # bytes on the device while it runs: idle models the manager had no reason to evict included
    stored: bool = False  # a model of the stage stored in float8
    streamed: bool = False  # the transformer's blocks streamed from RAM


class MetaStages(DiffusionStages):
    """The studio's stages and fallbacks as they are, but for the last fallback's tensor moves: accelerate's model
    CPU offload installs hooks that move real tensors (impossible on meta), so here it takes the same lease from
    the manager (models locked in RAM, the largest one's bytes reserved on the device) and installs nothing."""

    def _run_offloaded(self, plan: StagePlan, work):
        with self.manager.use(plan.keys, plan.working_memory, on_device=False, storage=plan.storage) as models:
            return dataclasses.replace(work(models, plan), offloaded=True)

    def _run_streamed(self, plan: StagePlan, work, streamed: frozenset[str]):
        return dataclasses.replace(super()._run_streamed(plan, work, streamed), streamed=True)


def new_manager(loader: MetaLoader, budget: int) -> ModelManager:
    """A manager as the studio builds one on a GPU (SD 3 and FLUX load in bfloat16), moving nothing: weights on the
    meta device have nowhere to go, and streaming installs no hooks."""
    loaders = {"diffusers": loader}
    if loader.controlnet is not None:
        loaders[CONTROLNET] = loader.controlnet
    return ModelManager(loaders, DEVICE, DTYPE, device_budget=budget, ram_budget=None, two_tiers=True,
                        move=lambda obj, device: None, dtype_for=DiffusersModels(DEVICE).dtype_for(load_presets()),
                        stream=lambda module, device: lambda: None)


def record(manager: ModelManager) -> Callable[[dict, StagePlan], StageRecord]:
    """The stage's `work`: nothing to compute on meta weights; it notes what the manager holds meanwhile."""
    def work(models: dict, plan: StagePlan) -> StageRecord:
        status = manager.status()
        own = sum(m.size for m in status.models if m.in_use and m.placement == ON_DEVICE) + status.reserved
        stored = any(m.in_use and m.dtype == "float8_e4m3fn" for m in status.models)
        return StageRecord(plan.stage, plan.vae_tiling, False, own, status.device_used + status.reserved, stored)

    return work


def stage_plans(stages: DiffusionStages, preset, width: int, height: int, guidance: bool,
                controls: PassControls | None = None) -> list[tuple[Callable[[bool], StagePlan], dict]]:
    """(plan_for, run_stage's options) per stage, as DiffusionStages.encode/denoise/decode/check pass them."""
    plans = [
        (lambda tiled: stages.plan_encode(preset, TASK, guidance), stage_fallbacks(preset, "encode")),
        (lambda tiled: stages.plan_denoise(preset, TASK, width, height, guidance, tiled, controls=controls),
         dict(can_tile=TASK != "text2img", **stage_fallbacks(preset, "denoise"))),
        (lambda tiled: stages.plan_decode(preset, TASK, width, height, tiled), dict(can_tile=True)),
    ]
    check = stages.plan_check(preset, TASK)
    if check is not None:
        plans.append((lambda tiled: check, {}))
    return plans


class BrokenBookkeeping(Exception):
    """The manager's books disagree with what the stages did: its plans can no longer be trusted."""


def run_one_image(loader: MetaLoader, preset, budget: int,
                  controls: PassControls | None = None) -> tuple[ModelManager, list[StageRecord]]:
    """One image at the preset's defaults on a fresh manager. Raises OutOfMemoryBudget if a stage cannot run, and
    BrokenBookkeeping if working memory is still counted as reserved once a stage is over."""
    manager = new_manager(loader, budget)
    stages = MetaStages(manager, DiffusersModels(DEVICE))
    width, height, guidance = preset.default_width, preset.default_height, preset.default_guidance > 1
    records = []
    for plan_for, options in stage_plans(stages, preset, width, height, guidance, controls):
        records.append(stages.run_stage(plan_for, record(manager), **options))
        left = manager.status().reserved
        if left != 0:
            raise BrokenBookkeeping(f"at a {budget / GIB:.2f} GiB budget, after the {records[-1].stage} stage the "
                                    f"manager counts {format_bytes(left)} as reserved (should be 0)")
    return manager, records


def fits(loader: MetaLoader, preset, budget: int, broken: list[str], controls: PassControls | None = None) -> bool:
    """Whether the image runs without OutOfMemoryBudget. A run whose bookkeeping broke does not count as fitting
    (the manager planned it with bytes it does not have); what broke is appended to `broken`."""
    try:
        run_one_image(loader, preset, budget, controls)
    except OutOfMemoryBudget:
        return False
    except BrokenBookkeeping as error:
        broken.append(str(error))
        return False
    return True


def smallest_budget(loader: MetaLoader, preset, broken: list[str], controls: PassControls | None = None) -> int:
    """The smallest multiple of 0.05 GiB at which the whole image runs (fits is monotonic in the budget)."""
    low, high = 0, round(BISECTION_CEILING / BISECTION_STEP)  # in steps: low does not fit, high does
    assert fits(loader, preset, int(high * BISECTION_STEP), broken, controls), \
        f"{preset.name} does not fit {BISECTION_CEILING}"
    while high - low > 1:
        middle = (low + high) // 2
        if fits(loader, preset, int(middle * BISECTION_STEP), broken, controls):
            high = middle
        else:
            low = middle
    return int(high * BISECTION_STEP)


def whole_pipeline_need(loader: MetaLoader, preset) -> int:
    """The old way: every component of the task on the device at once, with the larger of the UNet's and the VAE
    decode's working memory reserved, as one lease from the manager."""
    manager = new_manager(loader, BISECTION_CEILING)
    keys = DiffusersModels(DEVICE).keys(preset, TASK)
    family, guidance = family_of(preset), preset.default_guidance > 1
    working = working_memory_on(DEVICE, max(
        family.stage_working_memory("denoise", preset.default_width, preset.default_height, DTYPE, guidance),
        family.stage_working_memory("decode", preset.default_width, preset.default_height, DTYPE, guidance)))
    with manager.use(keys, working):
        pass
    return manager.status().peak


# ----- report -----


def describe_stage(stage: StageRecord) -> str:
    how = [word for word, on in (("tiled", stage.tiled), ("model CPU offload", stage.offloaded),
                                 ("float8 storage", stage.stored), ("blocks streamed", stage.streamed)) if on]
    if stage.stage == "decode" and not stage.tiled:
        how.insert(0, "untiled")
    label = f"{stage.stage} ({', '.join(how)})" if how else stage.stage
    return f"{label} {format_bytes(stage.held)} (own {format_bytes(stage.own)})"


def report_preset(loader: MetaLoader, preset, budget: int, controls: PassControls | None = None,
                  label: str = "") -> bool:
    size = f"{preset.default_width}x{preset.default_height}"
    try:
        manager, stages = run_one_image(loader, preset, budget, controls)
        peak, verdict, ok = format_bytes(manager.status().peak), "fits", True
    except (OutOfMemoryBudget, BrokenBookkeeping) as error:
        stages, peak, verdict, ok = [], "-", f"DOES NOT FIT ({error})", False
    weights = "bf16" if family_of(preset).flow_matching else "fp16"
    print(f"{preset.name}{label} {size} {weights}: peak {peak}, budget {format_bytes(budget)}: {verdict}")
    print(f"  CFG {preset.default_guidance:g} ({'with' if preset.default_guidance > 1 else 'no'} guidance); "
          f"per stage, held on the device: " + " / ".join(describe_stage(stage) for stage in stages))
    broken: list[str] = []
    least = smallest_budget(loader, preset, broken, controls)
    manager, at_least = run_one_image(loader, preset, least, controls)
    print(f"  smallest budget that fits: {least / GIB:.2f} GiB (peak {format_bytes(manager.status().peak)}): "
          + " / ".join(describe_stage(stage) for stage in at_least))
    if broken:
        print(f"  BOOKKEEPING BROKEN in {len(broken)} of the smaller trials (counted as not fitting), first "
              f"{broken[0]}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the same run: it already takes seconds (for tests/test_bench_smoke.py)")
    parser.parse_args()
    began = time.perf_counter()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    loader = MetaLoader(build_components())
    gc.freeze()  # the meta modules stay for the whole run: keep the manager's gc.collect() calls cheap
    presets = load_presets()
    print()
    failed = []
    for name, budget in CASES:
        if not report_preset(loader, presets.get(name), budget) and name in MUST_FIT:
            failed.append(name)
    for name, controlnet_name, config, file_megabytes, tolerance, budget in CONTROLNET_CASES:
        controlnet = load_controlnets().get(controlnet_name)
        print()
        built = build_controlnet(controlnet_name, config, file_megabytes, tolerance)
        with_controlnet = MetaLoader(loader.modules, MetaControlNetLoader(built))
        controls = PassControls((controlnet.key,), (None,), (UnitSettings(),))
        report_preset(with_controlnet, presets.get(name), budget, controls, f" + {controlnet_name}")
    print("\nthe flow-matching models (their weights in bfloat16; stored in float8 where a stage needs it):")
    for name, budget in FLOW_CASES:
        if not report_preset(loader, presets.get(name), budget):
            failed.append(f"{name} at {budget / GIB:g} GiB")
    sdxl = presets.get("sdxl-base-1.0")
    whole = whole_pipeline_need(loader, sdxl)
    print(f"\nfor contrast, one whole-pipeline lease (all components + max(UNet, VAE decode) working memory) for "
          f"sdxl-base-1.0 at {sdxl.default_width}x{sdxl.default_height}: {format_bytes(whole)}")
    print(f"\n{time.perf_counter() - began:.1f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)} did not fit the budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

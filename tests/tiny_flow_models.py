"""Tiny Stable Diffusion 3 and FLUX.1 folders (flow matching, transformer denoisers, T5 text encoders), sized from
diffusers' own test configs, with the embedded model's CLIP tokenizer and a character-level T5 tokenizer built here
(no Hub)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tiny_models import EMBEDDED, tiny_text_config

CLIP_WINDOW = 77  # SD3's and FLUX's CLIP encoders read 77 tokens (the embedded SD 1.x one reads 32)
T5_WINDOW = 512  # the most SD3 and FLUX pipelines accept as max_sequence_length
VAE_BLOCKS = (16, 32)  # two blocks: the VAE downsamples by 2 (SD3's and FLUX's by 8), 64 px -> 32x32 latents
VAE_SCALE = 2 ** (len(VAE_BLOCKS) - 1)


def flow_clip_tokenizer() -> CLIPTokenizer:
    """The embedded model's CLIP tokenizer with CLIP's real 77-token window. The embedded tokenizer.json also fixes
    truncation and padding at its 32 tokens (transformers resets both on every call, a bare `tokenizers` reader would
    not): cleared, as in the SD3 and FLUX repositories' tokenizer.json."""
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED, subfolder="tokenizer")
    tokenizer.model_max_length = CLIP_WINDOW
    tokenizer.init_kwargs["model_max_length"] = CLIP_WINDOW
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    for stale in ("max_length", "stride", "truncation_strategy", "pad_to_multiple_of", "pad_token_type_id",
                  "is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(stale, None)
    return tokenizer


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style Unigram, "▁" word marks, "</s>" appended) over single printable ASCII
    characters: ids as T5's (<pad> 0, </s> 1, <unk> 2), one token per character and one per word boundary, so a
    prompt of N characters gives about N tokens. No sentinel (<extra_id_N>) tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -3.0) for char in string.printable if not char.isspace()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_WINDOW)


def tiny_t5(tokenizer: T5TokenizerFast, d_model: int, seed: int) -> T5EncoderModel:
    """A two-layer T5 v1.1 encoder (gated GELU, as SD3's and FLUX's T5-XXL) over `tokenizer`'s vocabulary."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def tiny_flow_vae(scaling_factor: float, shift_factor: float, seed: int = 0) -> AutoencoderKL:
    """A 16-channel VAE that downsamples by 2 (two blocks; SD3's and FLUX's downsample by 8), without quant convs,
    with the model family's scaling and shift factors."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=list(VAE_BLOCKS), norm_num_groups=8, in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * len(VAE_BLOCKS),
                         up_block_types=["UpDecoderBlock2D"] * len(VAE_BLOCKS),
                         latent_channels=16, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def save_tiny_sd3(folder: Path) -> Path:
    """A 64 px Stable Diffusion 3 pipeline (MMDiT on 16-channel latents, two CLIP encoders with projections whose
    pooled outputs go side by side, a T5 encoder) saved as a diffusers folder. As in SD3 (768 + 1280 of 4096), the
    two CLIP encoders' hidden states side by side (32 + 48) are narrower than T5's (96) and the pipeline pads them."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=96, pooled_projection_dim=64, out_channels=16)
    tokenizer = flow_clip_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32, hidden_size=48))
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = tiny_t5(tokenizer_3, d_model=96, seed=3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler,
                                    vae=tiny_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _flux_components(in_channels: int, out_channels: int | None, guidance_embeds: bool) -> dict:
    """FLUX.1's parts: a transformer on 2x2-packed 16-channel latents, one CLIP encoder (its pooled output), a T5
    encoder (its hidden states), a 16-channel VAE and FLUX's resolution-dependent shift schedule."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=out_channels,
                                         num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    tokenizer = flow_clip_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, projection_dim=32))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = tiny_t5(tokenizer_2, d_model=32, seed=2)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return {"transformer": transformer, "scheduler": scheduler,
            "vae": tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}


def save_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A 64 px FLUX.1 pipeline saved as a diffusers folder: dev-like (guidance embedded in the transformer) or,
    with `guidance_embeds=False`, schnell-like."""
    pipe = FluxPipeline(**_flux_components(in_channels=64, out_channels=None, guidance_embeds=guidance_embeds))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_flux_fill(folder: Path) -> Path:
    """A 64 px FLUX.1 Fill pipeline (dev-like, guidance embedded) saved as a diffusers folder. Its transformer reads
    the packed noisy latents (16 x 4), the packed masked-image latents (16 x 4) and the packed mask (one channel per
    pixel of a VAE cell: scale^2 x 4), and predicts the packed latents (64). FLUX.1-Fill-dev's VAE scales by 8:
    64 + 64 + 256 = 384 inputs; this one scales by 2: 64 + 64 + 16 = 144."""
    in_channels = 16 * 4 + 16 * 4 + VAE_SCALE * VAE_SCALE * 4
    pipe = FluxFillPipeline(**_flux_components(in_channels=in_channels, out_channels=64, guidance_embeds=True))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    import tempfile
    import time

    from diffusers import DiffusionPipeline, StableDiffusion3InpaintPipeline
    from PIL import Image

    def folder_size(folder: Path) -> str:
        return f"{sum(path.stat().st_size for path in folder.rglob('*') if path.is_file()) / 2 ** 20:.2f} MiB"

    def timed(label: str, pipe, **arguments) -> None:
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="warm up", num_inference_steps=1, height=64, width=64, **arguments)
        walls, cpus = [], []
        for _ in range(3):  # best of three: a busy machine slows single runs
            wall, cpu = time.perf_counter(), time.process_time()
            image = pipe(prompt="a photo of a cat on a mat", num_inference_steps=4, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(0), **arguments).images[0]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        print(f"{label}: 4 steps at 64 px in {min(walls):.3f} s (CPU {min(cpus):.3f} s), {image.size}")

    torch.set_num_threads(1)  # as the tests run (tests/conftest.py: one thread per pytest-xdist worker)
    long_prompt = ("a photo of a cat on a mat, highly detailed, " * 20)[:600]
    source = Image.new("RGB", (64, 64), (200, 120, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        builds = {"sd3": save_tiny_sd3, "flux-dev": save_tiny_flux,
                  "flux-schnell": lambda folder: save_tiny_flux(folder, guidance_embeds=False),
                  "flux-fill": save_tiny_flux_fill}
        for name, build in builds.items():
            start = time.perf_counter()
            folder = build(root / name)
            print(f"{name}: built in {time.perf_counter() - start:.2f} s, {folder_size(folder)}")
        for name in ("sd3", "flux-dev", "flux-schnell"):
            pipe = DiffusionPipeline.from_pretrained(root / name)
            t5 = pipe.tokenizer_3 if name == "sd3" else pipe.tokenizer_2
            print(f"{name}: {type(pipe).__name__}, CLIP window {pipe.tokenizer.model_max_length}, "
                  f"{type(t5).__name__} window {t5.model_max_length}, "
                  f"600-character prompt -> {len(t5(long_prompt).input_ids)} T5 tokens")
            timed(name, pipe)
        sd3_inpaint = StableDiffusion3InpaintPipeline.from_pretrained(root / "sd3")
        timed("sd3 inpaint", sd3_inpaint, image=source, mask_image=mask, strength=1.0)
        fill = DiffusionPipeline.from_pretrained(root / "flux-fill")
        print(f"flux-fill: {type(fill).__name__}")
        timed("flux-fill", fill, image=source, mask_image=mask)


def save_random_flow_lora(pipeline_folder: Path, out: Path, layout: str = "diffusers", seed: int = 0,
                          rank: int = 4, strength: float = 0.5) -> Path:
    """A random LoRA for a tiny FLUX (or, with layout "diffusers", SD 3) folder, in one of the layouts FLUX LoRAs
    come in: "diffusers" (PEFT names under transformer.), "kohya" (sd-scripts: lora_unet_double_blocks_0_img_attn_qkv
    ... with alphas, as Civitai's files) or "xlabs" (XLabs' double_blocks.0.processor.qkv_lora1 ...). The
    up matrices are random too (a trained LoRA's are not zero), scaled by `strength`."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * strength

    pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    if layout == "diffusers":
        tensors = {}
        for name, module in pipe.transformer.named_modules():
            if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")):
                tensors[f"transformer.{name}.lora_A.weight"] = random(rank, module.in_features)
                tensors[f"transformer.{name}.lora_B.weight"] = random(module.out_features, rank)
    elif layout == "kohya":
        # (diffusers splits kohya's fused qkv and linear1 layers at FLUX.1's own widths, 3072 and 12288: a tiny model
        # cannot have those; its other layers convert by name alone)
        mlp = int(width * 4)  # FLUX's MLP ratio
        shapes = {"lora_unet_double_blocks_0_img_attn_proj": (width, width),
                  "lora_unet_double_blocks_0_img_mlp_0": (width, mlp),
                  "lora_unet_double_blocks_0_img_mlp_2": (mlp, width),
                  "lora_unet_double_blocks_0_txt_attn_proj": (width, width),
                  "lora_unet_single_blocks_0_linear2": (width + mlp, width)}
        tensors = {}
        for name, (inputs, outputs) in shapes.items():
            tensors[f"{name}.lora_down.weight"] = random(rank, inputs)
            tensors[f"{name}.lora_up.weight"] = random(outputs, rank)
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    elif layout == "xlabs":
        tensors = {}
        for lora, outputs in (("qkv_lora1", 3 * width), ("proj_lora1", width), ("qkv_lora2", 3 * width),
                              ("proj_lora2", width)):
            tensors[f"double_blocks.0.processor.{lora}.down.weight"] = random(rank, width)
            tensors[f"double_blocks.0.processor.{lora}.up.weight"] = random(outputs, rank)
    else:
        raise ValueError(f"Unknown LoRA layout {layout!r}")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(out))
    return out

"""Diffusion Studio: the composition root. Parses flags, builds the engine objects once, builds the UI, launches.

    python app.py                      # http://127.0.0.1:7860, embedded model on the CPU, works offline
    python app.py --preset stable-diffusion-1.5 --device cuda
    python app.py --public             # allow-listed presets, stricter limits (for a public Space)
"""

from __future__ import annotations

import os

# ZeroGPU Spaces need `spaces` imported before anything touches CUDA.
ON_ZEROGPU = bool(os.environ.get("SPACES_ZERO_GPU"))
if ON_ZEROGPU:
    import spaces  # noqa: F401

import argparse
import inspect
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from components.inpaint import build_inpaint_tab, editor_with_background
from components.status import build_status_bar
from components.text_to_image import build_text_to_image_tab
from studio import __version__
from studio.devices import default_device_budget, default_dtype, default_ram_budget, parse_bytes, resolve_device
from studio.generation import RequestLimits, TextToImage
from studio.inpainting import Inpainter
from studio.memory import ModelManager
from studio.pipelines import DiffusersFactory
from studio.presets import PRESETS_DIR, load_presets, load_styles
from studio.sessions import CancelRegistry

# Small images (the embedded model makes 64 px) are shown enlarged: keep their pixels crisp, not smeared.
CSS = "#text-to-image-gallery img, #inpaint-gallery img { image-rendering: pixelated; }"

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Diffusion Studio: a Gradio studio for Stable Diffusion.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve on a temporary *.gradio.live link")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    parser.add_argument("--device-budget", help="bytes of weights + working memory on the device, e.g. 6GiB "
                        "(default: 90%% of free VRAM; 60%% of available RAM on the CPU)")
    parser.add_argument("--ram-budget", help="bytes of weights kept in RAM off the device, e.g. 16GiB "
                        "(default: 60%% of available RAM)")
    parser.add_argument("--preset", help="the preset selected at start (default: from presets/models.yaml)")
    parser.add_argument("--presets-file", type=Path, default=PRESETS_DIR / "models.yaml")
    parser.add_argument("--public", action="store_true", default=bool(os.environ.get("DIFFUSION_STUDIO_PUBLIC")),
                        help="public demo mode: only presets marked public, stricter limits, smaller queue "
                        "(also set by the environment variable DIFFUSION_STUDIO_PUBLIC=1, e.g. on a Space)")
    parser.add_argument("--max-queue", type=int, default=None, help="most requests waiting (default 64; 20 public)")
    parser.add_argument("--preload", nargs="*", default=None,
                        help="presets to load at start (ZeroGPU preloads the default preset anyway)")
    return parser.parse_args(argv)


@dataclass
class Studio:
    """Every engine object the UI uses, built once."""

    manager: ModelManager
    text_to_image: TextToImage
    inpainter: Inpainter
    cancels: CancelRegistry


def build_studio(args: argparse.Namespace) -> Studio:
    device = torch.device("cuda") if ON_ZEROGPU else resolve_device(args.device)
    presets = load_presets(args.presets_file)
    if args.public:
        presets = presets.only([p.name for p in presets if p.public])
    if args.preset:
        presets = presets.only(presets.names, default=presets.get(args.preset).name)
    factory = DiffusersFactory(device)
    if ON_ZEROGPU:
        # The GPU is attached only inside @spaces.GPU calls: no driver to ask, and everything stays loaded.
        device_budget = parse_bytes(args.device_budget or "40GiB")
    else:
        device_budget = parse_bytes(args.device_budget) if args.device_budget else default_device_budget(device)
    manager = ModelManager(
        factory,
        device,
        default_dtype(device),
        device_budget=device_budget,
        ram_budget=parse_bytes(args.ram_budget) if args.ram_budget else default_ram_budget(),
        ask_driver=not ON_ZEROGPU,
    )
    limits = RequestLimits.public() if args.public else RequestLimits()
    version = f"Diffusion Studio {__version__}"
    text_to_image = TextToImage(manager, factory, presets, load_styles(), limits, version=version)
    inpainter = Inpainter(manager, factory, presets, limits, version=version)
    for name in (args.preload or []) + ([presets.default] if ON_ZEROGPU else []):
        manager.preload(presets.get(name), "text2img")
    return Studio(manager=manager, text_to_image=text_to_image, inpainter=inpainter, cancels=CancelRegistry())


def gpu_decorator(fn):
    """spaces.GPU on ZeroGPU, its duration growing with the call's `steps` x `batch_size`; identity elsewhere."""
    if not ON_ZEROGPU:
        return fn
    signature = inspect.signature(fn)

    def duration(*args, **kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        return min(300, 30 + int(arguments.get("steps", 50)) * int(arguments.get("batch_size", 1)))

    return spaces.GPU(duration=duration)(fn)


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Diffusion Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Diffusion Studio\nText to image and inpainting with Stable Diffusion. Upscale and Compare "
                    "are coming.")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text-to-image", elem_id="text-to-image-tab"):
                text_tab = build_text_to_image_tab(studio.text_to_image, studio.cancels, gpu=gpu_decorator)
            with gr.Tab("Inpaint", id="inpaint", elem_id="inpaint-tab"):
                inpaint_tab = build_inpaint_tab(studio.inpainter, studio.cancels, gpu=gpu_decorator)
        build_status_bar(studio.manager, refresh_after=[text_tab.generate_event, inpaint_tab.generate_event])
        text_tab.fit_to_preset(demo)
        inpaint_tab.fit_to_preset(demo)

        def send_to_inpaint(gallery, index):
            if not gallery:
                raise gr.Error("Generate an image first.")
            image, _caption = gallery[min(index or 0, len(gallery) - 1)]
            return editor_with_background(image), gr.Tabs(selected="inpaint")

        text_tab.send_to_inpaint.click(send_to_inpaint, [text_tab.gallery, text_tab.selected],
                                       [inpaint_tab.editor, tabs], api_visibility="private", queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    studio = build_studio(args)
    demo = build_ui(studio)
    demo.queue(max_size=args.max_queue or (20 if args.public else 64), default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        ssr_mode=False,
        max_file_size="20mb",
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api", "gradio"],
    )


if __name__ == "__main__":
    main()

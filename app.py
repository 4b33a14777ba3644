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
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from components.arena import build_arena_tab
from components.compare import build_compare_tab
from components.event_options import INSTANT, QUICK
from components.inpaint import build_inpaint_tab
from components.running import JobRunner, chosen_result
from components.queue_polling import poll_the_queue_less_often
from components.session_config import cache_init_signatures, make_session_configs_on_demand
from components.status import build_status_bar
from components.text_to_image import build_text_to_image_tab
from components.upscale import build_upscale_tab
from studio.arena.battles import Arena, load_contestants
from studio.arena.votes import default_votes_url, open_store
from studio.core.devices import (
    default_device_budget,
    default_ram_budget,
    free_device_bytes,
    parse_bytes,
    resolve_device,
)
from studio.core.downloads import HubDownloads
from studio.core.errors import StudioError
from studio.core.jobs import JobBoard
from studio.core.memory import ModelManager
from studio.core.sessions import RateLimiter
from studio.evaluation.compare import CompareLimits, Comparison
from studio.evaluation.metrics import EMBEDDED_CLIP, ClipScorer, default_clip_scorer
from studio.evaluation.model_kinds import CLIP, ClipLoader, clip_key
from studio.models.controlnets import CONTROLNET, ControlNetCatalog, load_controlnets
from studio.models.faces import FACE_RESTORER, FaceRestoration, FaceRestorerLoader, load_face_restorers
from studio.models.families import family_of
from studio.models.loading import HubAccess
from studio.models.loras import (
    DEFAULT_LORA_FOLDER,
    DEFAULT_LORA_PRESETS,
    LoraCatalog,
    fits,
    load_loras,
    lora_key,
    made_for,
    model_made_for,
)
from studio.models.presets import PRESETS_DIR, PresetCatalog, load_presets
from studio.models.preview_decoders import (
    NO_PREVIEW_DECODER,
    PREVIEW_DECODER,
    decoder_download,
    preview_decoder_key,
    preview_decoder_of,
)
from studio.models.upscalers import ReleaseFiles, UpscalerCatalog, load_upscalers, upscaler_key
from studio.tasks.engines import DEFAULT_UPSCALER_CACHE, ManagerSettings, build_engines, build_manager
from studio.tasks.generation import TextToImage
from studio.tasks.inpainting import Inpainter
from studio.tasks.requests import RequestLimits
from studio.tasks.upscaling import UpscaleLimits, Upscaling

log = logging.getLogger("studio")

# Small images (the embedded model makes 64 px) are shown enlarged: keep their pixels crisp, not smeared.
# Results: gradio draws square thumbnails as wide as their column, so a single result (at 1280 px and up) and a
# batch's second row ran past the gallery's height and were cut off. Its rows share the gallery's height instead,
# each image contained in its cell; five images or more take four columns; captions wrap rather than end in "…".
# The history is a strip of small, equal thumbnails in whole rows: as tall as its rows up to three, then it scrolls
# a row at a time. Only an unfinished image has a caption there (inside the thumbnail).
# Compare's cells: each caption whole, under its image (gradio's one-line caption cut it to "Sampler: Eule…"), the
# first row below the gallery's long label (it covered their tops).
# Inpaint: the palette's white swatch gets an outline (it was invisible on the white palette); the results column,
# with the Inpaint button on top, stays in view while the editor and settings scroll (two columns); when the columns
# stack (narrow windows, editor first) the buttons stay in a bar at the bottom of the screen.
CSS = """
#text-to-image-gallery img, #inpaint-gallery img { image-rendering: pixelated; }
#text-to-image-gallery .grid-container, #inpaint-gallery .grid-container {
  height: 100%; grid-template-rows: none; grid-auto-rows: minmax(0, 1fr); }
#text-to-image-gallery .grid-container:has(> :nth-child(5)), #inpaint-gallery .grid-container:has(> :nth-child(5)) {
  grid-template-columns: repeat(4, minmax(0, 1fr)); }
#text-to-image-gallery .thumbnail-item, #inpaint-gallery .thumbnail-item { aspect-ratio: auto; }
#text-to-image-gallery .caption-label, #inpaint-gallery .caption-label { white-space: normal; }
#compare-grid .thumbnail-lg { max-height: 470px; margin: 0 auto; }
#compare-grid img, #compare-cells img, #compare-slider img { image-rendering: pixelated; }
#compare-cells .grid-wrap { max-height: 520px; }
#compare-cells .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); grid-template-rows: none; grid-auto-rows: auto; }
#compare-cells .grid-container.pt-6 { padding-top: 36px; }
#compare-cells .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#compare-cells .thumbnail-item > img { aspect-ratio: 1; height: auto; }
#compare-cells .caption-label { position: static; max-width: none; white-space: normal; border: 0; border-radius: 0; }
.history-gallery img { image-rendering: pixelated; }
.arena-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.history-gallery .grid-wrap {
  max-height: calc(3 * 112px + 2 * var(--spacing-lg) + 2 * var(--size-2)); scroll-snap-type: y mandatory; }
.history-gallery .grid-container { grid-template-columns: repeat(auto-fill, 112px) !important; grid-auto-rows: 112px; }
.history-gallery .gallery-item { scroll-snap-align: start; scroll-margin-top: var(--size-2); }
.history-gallery .thumbnail-item { width: 112px; height: 112px; max-height: 112px; }
#inpaint-editor button.color { box-shadow: inset 0 0 0 1px var(--border-color-primary); }
/* gradio's container clips with overflow: hidden, which makes it the (never scrolled) box sticky elements stick in;
   clip looks the same and lets them stick to the page */
.gradio-container { overflow: clip !important; }
@media (min-width: 768px) {
  /* nowrap: with a capped height, gradio's wrapping column put the history in a clipped second column; the cap
     leaves room for the status line and footer under the row, which would push a taller column up and cut off the
     button when the page is scrolled to its end */
  #inpaint-results { position: sticky; top: var(--size-2); align-self: flex-start; flex-wrap: nowrap;
                     max-height: calc(100vh - 140px); overflow-y: auto; }
  #inpaint-results > * { flex-shrink: 0; }  /* each part at its own height; the column scrolls */
}
/* a narrow window stacks the columns (editor, settings, then results): Inpaint and Stop stay at the bottom of the
   screen, and the page scrolls to the results when a request starts (components/running.py) */
@media (max-width: 767px) {
  #inpaint-actions { position: fixed; left: 0; right: 0; bottom: 0; z-index: 50; margin: 0;
                     padding: var(--size-2) var(--size-4); background: var(--background-fill-primary);
                     box-shadow: 0 -2px 8px rgb(0 0 0 / 0.15); }
  #inpaint-tab { padding-bottom: 72px; }
}
.history-gallery .caption-label { left: 4px; right: 4px; max-width: none; white-space: normal; font-size: 11px; }
"""
PUBLIC_RATE_LIMIT = 12  # jobs per minute per visitor in --public mode


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
    parser.add_argument("--hub-cache-budget", help="disk kept for downloaded models, e.g. 100GB; the least recently "
                        "used are deleted beyond it (default: no limit)")
    parser.add_argument("--upscaler-cache", type=Path, default=DEFAULT_UPSCALER_CACHE,
                        help="where Real-ESRGAN's release files are kept (default: %(default)s)")
    parser.add_argument("--preset", help="the preset selected at start (default: from presets/models.yaml)")
    parser.add_argument("--presets-file", type=Path, default=PRESETS_DIR / "models.yaml")
    parser.add_argument("--loras-dir", type=Path, default=DEFAULT_LORA_FOLDER,
                        help="LoRA .safetensors files offered by file name, as <lora:name:weight> (default: loras/)")
    parser.add_argument("--loras-file", type=Path, default=DEFAULT_LORA_PRESETS,
                        help="Hub LoRAs offered (default: presets/loras.yaml)")
    parser.add_argument("--public", action="store_true", default=bool(os.environ.get("DIFFUSION_STUDIO_PUBLIC")),
                        help="public demo mode: only presets marked public, a safety checker on every preset, stricter "
                        "limits, a per-visitor rate limit, a smaller queue (also set by the environment variable "
                        "DIFFUSION_STUDIO_PUBLIC=1, e.g. on a Space)")
    parser.add_argument("--allow-non-commercial", action="store_true",
                        default=bool(os.environ.get("DIFFUSION_STUDIO_ALLOW_NON_COMMERCIAL")),
                        help="with --public, also offer presets under a non-commercial licence (FLUX.1-dev): for a "
                             "Space that is itself non-commercial")
    parser.add_argument("--max-queue", type=int, default=None, help="most requests waiting (default 64; 20 public)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="jobs in flight at once; they take turns on the device between images (default 4)")
    parser.add_argument("--rate-limit", type=int, default=None,
                        help=f"jobs per minute per visitor (default: none; {PUBLIC_RATE_LIMIT} in --public mode)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DIFFUSION_STUDIO_DATA", "data")),
                        help="where the Arena's votes are kept (default ./data; on a Space with persistent storage "
                        "use /data)")
    parser.add_argument("--votes-db", default=os.environ.get("DIFFUSION_STUDIO_VOTES_DB"),
                        help="the Arena's votes database: a SQLite file (default: arena-votes.sqlite3 in --data-dir) "
                        "or postgresql://user:password@host/db for a Space with several replicas (also set by the "
                        "environment variable DIFFUSION_STUDIO_VOTES_DB, e.g. a Space secret)")
    parser.add_argument("--preload", nargs="*", default=None,
                        help="presets to load at start (ZeroGPU loads every offered preset at start anyway)")
    return parser.parse_args(argv)


@dataclass
class Studio:
    """Every engine object the UI uses, built once."""

    manager: ModelManager
    text_to_image: TextToImage
    inpainter: Inpainter
    upscaling: Upscaling
    comparison: Comparison
    arena: Arena
    runner: JobRunner


def build_studio(args: argparse.Namespace) -> Studio:
    device = torch.device("cuda") if ON_ZEROGPU else resolve_device(args.device)
    presets = load_presets(args.presets_file)
    if args.public:
        # the allow-list; a non-commercial licence (FLUX.1-dev) only where the Space's owner says so
        presets = presets.only([p.name for p in presets
                                if p.public and (args.allow_non_commercial or not p.non_commercial)])
    if args.preset:
        presets = presets.only(presets.names, default=presets.get(args.preset).name)
    if ON_ZEROGPU:
        # The GPU is attached only inside @spaces.GPU calls: no driver to ask, and everything stays loaded.
        device_budget, free_memory = parse_bytes(args.device_budget or "40GiB"), None
    else:
        device_budget = parse_bytes(args.device_budget) if args.device_budget else default_device_budget(device)
        free_memory = functools.partial(free_device_bytes, device)
    manager, models = build_manager(presets, ManagerSettings(
        device=device, device_budget=device_budget, free_memory=free_memory, public=args.public,
        ram_budget=parse_bytes(args.ram_budget) if args.ram_budget else default_ram_budget(),
        extra_loaders={CLIP: ClipLoader(), FACE_RESTORER: FaceRestorerLoader()}))
    downloads = HubDownloads(disk_budget=parse_bytes(args.hub_cache_budget) if args.hub_cache_budget else None,
                             offline=HubAccess().offline)
    for name in dict.fromkeys(args.preload or []):
        preload_preset(manager, models, downloads, presets.get(name), pin=False)
    if ON_ZEROGPU:  # every offered preset is loaded now, in this process; one that cannot load is not offered
        loaded = [p.name for p in presets if preload_preset(manager, models, downloads, p, pin=True)]
        presets = presets.only(loaded or [presets.default])
    loras = load_loras(args.loras_dir, args.loras_file)
    if ON_ZEROGPU:  # nothing may load in the GPU worker: each LoRA is placed now for the presets it fits
        loras = preload_loras(manager, models, downloads, presets, loras)
    release_files = ReleaseFiles(args.upscaler_cache, offline=HubAccess().offline)
    upscalers = load_upscalers()
    if ON_ZEROGPU:  # nothing may load in the GPU worker: the upscalers are placed now, like the presets
        upscalers = preload_upscalers(manager, upscalers, release_files)
    faces = FaceRestoration(manager, load_face_restorers(), release_files)  # those whose files are present
    if ON_ZEROGPU:  # placed now, like the upscalers
        faces = preload_face_restorers(manager, faces)
    controlnets = load_controlnets()
    if ON_ZEROGPU:  # the ControlNets of the offered presets' families, placed now like the presets
        controlnets = preload_controlnets(manager, downloads, presets, controlnets)
        presets = preload_preview_decoders(manager, downloads, presets)  # the live previews' TAESDs, likewise
    engines = build_engines(
        manager, models, presets, limits=RequestLimits.public() if args.public else RequestLimits(),
        upscale_limits=UpscaleLimits.public() if args.public else UpscaleLimits(), loras=loras, upscalers=upscalers,
        release_files=release_files, faces=faces, downloads=downloads, controlnets=controlnets)
    text_to_image = engines.text_to_image
    clip = clip_scorer(manager)
    if ON_ZEROGPU:  # the Compare tab scores on the GPU worker, where nothing may load
        try:
            manager.preload({"clip": clip_key(clip.source)}, pin=True)
        except StudioError as error:
            log.warning("could not preload the CLIP scorer: %s", str(error).splitlines()[0])
            clip = None
    comparison = Comparison(text_to_image, clip, CompareLimits.public() if args.public else CompareLimits())
    arena = Arena(text_to_image, open_store(args.votes_db or default_votes_url(args.data_dir)), load_contestants(),
                  clip)
    rate_limit = args.rate_limit or (PUBLIC_RATE_LIMIT if args.public else None)
    runner = JobRunner(
        board=JobBoard(),  # shared memory for Stop and progress: made before ZeroGPU forks its GPU worker
        gpu=zerogpu_wrapper(manager) if ON_ZEROGPU else (lambda fn, duration: fn),
        limiter=RateLimiter(rate_limit) if rate_limit else None,
        concurrency=args.concurrency,
    )
    return Studio(manager=manager, text_to_image=text_to_image, inpainter=engines.inpainter,
                  upscaling=engines.upscaling, comparison=comparison, arena=arena, runner=runner)


def clip_scorer(manager: ModelManager) -> ClipScorer:
    """The CLIP the Compare tab scores with: OpenAI's ViT-L/14 (the CLIP score papers report) where its weights are
    in the Hub cache, otherwise the embedded CLIP, which works offline. The table names which."""
    return default_clip_scorer(manager, EMBEDDED_CLIP)


def preload_preset(manager, models, downloads, preset, pin: bool) -> bool:
    """Fetch and place a preset's text-to-image and inpainting models; True when it worked. On ZeroGPU this runs
    in the main process at start, on 'cuda', pinned (spaces moves what is there into each GPU worker, and
    nothing may load in a worker); elsewhere the models are only warmed, and evicted like any other."""
    try:
        for task in ("text2img", "inpaint"):
            models.check_checkpoint_files(preset, task)
            for request in models.download_requests(preset, task, manager.dtype):
                downloads.ensure(request)
            manager.preload(models.keys(preset, task), pin=pin)
            models.model_hash(preset, task)  # a checkpoint file's sha256 is read now, not by the first visitor
    except StudioError as error:  # one preset that cannot load must not stop the server
        log.warning("could not preload %s: %s", preset.name, str(error).splitlines()[0])
        return False
    except Exception:  # noqa: BLE001 - a real fault: keep its traceback, but serve the other presets
        log.exception("could not preload %s", preset.name)
        return False
    log.info("preloaded %s on %s", preset.name, manager.device)
    return True


def preload_loras(manager: ModelManager, models, downloads, presets, catalog: LoraCatalog) -> LoraCatalog:
    """ZeroGPU: every LoRA fetched and placed (pinned) for each LoRA format of the presets whose family it fits;
    one that fits none, or cannot load, is not offered."""
    kept = []
    for name in catalog.names:
        # a Hub LoRA whose `family` fits none of the presets is not even downloaded
        if not any(catalog.get(name).fits(model_made_for(models, p)) for p in presets):
            continue
        try:
            path = catalog.path(name, downloads)
            target = made_for(path)
            fitting = [p for p in presets if fits(target, model_made_for(models, p))]
            for key in dict.fromkeys(lora_key(path, family_of(p)) for p in fitting):  # one per LoRA loader
                manager.preload({"lora": key}, pin=True)
            if fitting:
                kept.append(name)
        except StudioError as error:
            log.warning("could not preload LoRA %s: %s", name, str(error).splitlines()[0])
    return catalog.only(kept)


def preload_controlnets(manager: ModelManager, downloads, presets, catalog: ControlNetCatalog) -> ControlNetCatalog:
    """ZeroGPU: every ControlNet made for a family of the offered presets fetched and placed (pinned) now; one that
    cannot be is not offered (nothing may load in the GPU worker)."""
    families = {preset.family for preset in presets}
    kept = []
    for controlnet in catalog:
        if controlnet.family not in families:
            continue
        try:
            request = controlnet.download_request(manager.dtype)
            if request is not None:
                downloads.ensure(request)
            manager.preload({CONTROLNET: controlnet.key}, pin=True)
            kept.append(controlnet.name)
        except StudioError as error:
            log.warning("could not preload ControlNet %s: %s", controlnet.name, str(error).splitlines()[0])
    return catalog.only(kept)


def preload_preview_decoders(manager: ModelManager, downloads, presets: PresetCatalog) -> PresetCatalog:
    """ZeroGPU: each offered preset's TAESD fetched and placed (pinned) now; a preset whose TAESD cannot be has it
    turned off (`preview_decoder: none`: Fast previews), since nothing may load in the GPU worker."""
    kept = []
    for preset in presets:
        source = preview_decoder_of(preset)
        try:
            if source is not None:
                download = decoder_download(source)
                if download is not None:
                    downloads.ensure(download)
                manager.preload({PREVIEW_DECODER: preview_decoder_key(source)}, pin=True)
        except StudioError as error:
            log.warning("could not preload the TAESD of %s: %s", preset.name, str(error).splitlines()[0])
            preset = dataclasses.replace(preset, preview_decoder=NO_PREVIEW_DECODER)
        kept.append(preset)
    return PresetCatalog(kept, default=presets.default)


def preload_upscalers(manager: ModelManager, catalog: UpscalerCatalog, files: ReleaseFiles) -> UpscalerCatalog:
    """ZeroGPU: every model upscaler fetched and placed (pinned) now; the catalog narrowed to those that could be.
    A denoise strength would be another model for each value, loaded in the worker, so there it is fixed at 1
    (realesr-general-x4v3 alone) and its slider hidden."""
    kept = []
    for preset in catalog.presets.values():
        try:
            if preset.is_model:
                preset = dataclasses.replace(preset, denoise_file=None)
                if preset.file:
                    files.ensure(preset.file)
                manager.preload({"upscaler": upscaler_key(preset, files)}, pin=True)
                catalog = catalog.with_preset(preset)
            kept.append(preset.name)
        except StudioError as error:
            log.warning("could not preload upscaler %s: %s", preset.name, str(error).splitlines()[0])
    return catalog.only(kept)


def preload_face_restorers(manager: ModelManager, faces: FaceRestoration) -> FaceRestoration:
    """ZeroGPU: each face restorer whose files are present placed (pinned) now; one that cannot load is not offered."""
    for name in faces.names:
        try:
            manager.preload({"faces": faces.key(name)}, pin=True)
        except StudioError as error:
            log.warning("could not preload face restorer %s: %s", name, str(error).splitlines()[0])
            del faces.presets[name]
    return faces


def zerogpu_wrapper(manager: ModelManager):
    """spaces.GPU with the job's own duration estimate. Inside the GPU worker (a fork of this process) the
    manager may not load: a model loaded there would be lost when the worker is replaced, and this process's
    status line would never learn of it."""

    def wrap(fn, duration):
        @functools.wraps(fn)
        def in_gpu_worker(*args, **kwargs):
            manager.loading_allowed = False  # the worker's copy of the manager; the main process's is untouched
            return fn(*args, **kwargs)

        return spaces.GPU(duration=duration)(in_gpu_worker)

    return wrap


def show_tab(event, tabs: gr.Tabs, tab_id: str) -> None:
    """After `event` succeeds, the page shows the tab `tab_id`. Done in the browser: a server event with the Tabs
    as an output makes gradio 6.31 re-read every component inside them at each later status update of any event,
    the Inpaint editor too, which then re-uploads its image (seconds per progress tick)."""
    event.success(None, None, tabs, js=f"() => ({{__type__: 'update', selected: '{tab_id}'}})", **INSTANT)


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Diffusion Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Diffusion Studio\nText to image, inpainting, upscaling, X/Y/Z comparisons and a blind-vote "
                    "arena with Stable Diffusion and Real-ESRGAN.")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text-to-image", elem_id="text-to-image-tab"):
                text_tab = build_text_to_image_tab(studio.text_to_image, studio.runner)
            with gr.Tab("Inpaint", id="inpaint", elem_id="inpaint-tab"):
                inpaint_tab = build_inpaint_tab(studio.inpainter, studio.runner)
            with gr.Tab("Upscale", id="upscale", elem_id="upscale-tab"):
                upscale_tab = build_upscale_tab(studio.upscaling, studio.runner)
            with gr.Tab("Compare", id="compare", elem_id="compare-tab"):
                compare_tab = build_compare_tab(studio.comparison, studio.runner)
            with gr.Tab("Arena", id="arena", elem_id="arena-tab"):
                examples = list(studio.text_to_image.presets.get(studio.text_to_image.presets.default).examples)
                arena_tab = build_arena_tab(studio.arena, studio.runner, examples)
        build_status_bar(demo, studio.manager, refresh_after=[text_tab.generate_event, inpaint_tab.generate_event,
                                                             upscale_tab.upscale_event, compare_tab.compare_event,
                                                             arena_tab.battle_event])
        text_tab.fit_to_preset(demo)
        inpaint_tab.fit_to_preset(demo)
        arena_tab.show_board(demo)

        def send_to_inpaint(gallery, index, prompt, negative_prompt, mode):
            """The chosen image into the Inpaint editor (brush fitted to it), with its prompts, as A1111's "Send to
            inpaint" does."""
            image = chosen_result(gallery, index, "Generate an image first, then send it to Inpaint.")
            return (*inpaint_tab.image_updates(image, mode), prompt, negative_prompt)

        # queued (outside the GPU group), so that its error shows as a toast: gradio shows none for unqueued events
        sent = text_tab.send_to_inpaint.click(
            send_to_inpaint,
            [text_tab.gallery, text_tab.selected, text_tab.prompt, text_tab.negative_prompt, inpaint_tab.mode],
            [*inpaint_tab.image_outputs, inpaint_tab.prompt, inpaint_tab.negative_prompt], **QUICK,
        )
        inpaint_tab.apply_to_editor(sent)
        show_tab(sent, tabs, "inpaint")

        def send_to_upscale(gallery, index):
            """The chosen result into the Upscale tab, with its PNG parameters (kept in the upscaled PNG)."""
            return chosen_result(gallery, index, "There is no result to send yet: make one first.")

        for tab in (text_tab, inpaint_tab):
            sent_up = tab.send_to_upscale.click(send_to_upscale, [tab.gallery, tab.selected], upscale_tab.image,
                                                **QUICK)
            show_tab(sent_up, tabs, "upscale")
    # every API call without a session starts a session of its own (see the module)
    cache_init_signatures(demo)
    make_session_configs_on_demand()
    return demo


def queue_requests(demo: gr.Blocks, args: argparse.Namespace) -> None:
    """The queue every generating event waits in: bounded (a public demo's smaller), one job at a time per event
    (jobs take turns on the device), polled less often than gradio's default."""
    demo.queue(max_size=args.max_queue or (20 if args.public else 64), default_concurrency_limit=1)
    poll_the_queue_less_often(demo)  # an idle server's CPU: 4.7% of a core -> 1.9% (see the module)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("studio").setLevel(logging.INFO)  # ours: one line per refused request, preloads
    args = parse_args(argv)
    studio = build_studio(args)
    demo = build_ui(studio)
    queue_requests(demo, args)
    # quiet: gradio's own banner tells people to "set `share=True` in `launch()`"; our switch is --share
    _, local_url, _ = demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        ssr_mode=False,
        max_file_size="20mb",
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api", "gradio"],
        quiet=True,
        prevent_thread_lock=True,
    )
    print(f"* Running on local URL:  {local_url}", flush=True)
    if not args.share:  # with --share gradio itself prints the public URL, or why it could not make one
        print("* For a public link, start it with --share.", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()

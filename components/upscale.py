"""The Upscale tab: an image made 1× to 8× larger by Real-ESRGAN (or the embedded upscaler, or Lanczos), shown
before/after on a slider, and offered as a PNG that keeps the input's parameters plus A1111's extras text."""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image, PngImagePlugin

from components.event_options import INSTANT, QUICK
from components.running import JobRunner, user_error
from components.whole_numbers import WholeNumber
from studio.core.errors import InvalidRequest, StudioError
from studio.core.images import open_image, to_8bit
from studio.models.faces import NO_FACE_RESTORATION
from studio.tasks.requests import whole
from studio.tasks.upscaling import MAX_SCALE, MIN_SCALE, UpscaleRequest, Upscaling, check_upscale

TAB = "upscale"
AUTOMATIC_TILE = -1  # as seed -1 is random: the tile is chosen from the free memory


@dataclass
class UpscaleTab:
    image: gr.Image  # "Send to Upscale" fills it
    upscale_event: gr.events.Dependency


def form_request(upscaler, scale, tile, denoise_strength, face_restoration=NO_FACE_RESTORATION,
                 face_visibility=1.0) -> UpscaleRequest:
    tile = None if tile is None or tile == "" or tile == AUTOMATIC_TILE else whole(tile)  # a fraction is refused
    return UpscaleRequest(upscaler, float(scale), tile, float(denoise_strength),
                          face_restoration or NO_FACE_RESTORATION, float(face_visibility))


class PngFolder:
    """Where the tab writes its result PNGs for download (gradio copies them into its own cache); files older than
    an hour are deleted as new ones come, so a long-running server does not fill its disk."""

    def __init__(self, max_age_s: float = 3600):
        self.folder = Path(tempfile.mkdtemp(prefix="diffusion-studio-upscaled-"))
        self.max_age_s = max_age_s
        weakref.finalize(self, shutil.rmtree, self.folder, True)  # gone with the server

    def save(self, image: Image.Image) -> str:
        """The result as a PNG with its text chunks (the input's `parameters`, A1111's `postprocessing`)."""
        self._prune()
        info = PngImagePlugin.PngInfo()
        for key in ("parameters", "postprocessing"):
            if isinstance(image.info.get(key), str):
                info.add_text(key, image.info[key])
        path = Path(tempfile.mkdtemp(dir=self.folder)) / "upscaled.png"
        image.save(path, pnginfo=info)
        return str(path)

    def _prune(self) -> None:
        now = time.time()
        for old in self.folder.glob("*/upscaled.png"):
            try:
                expired = now - old.stat().st_mtime > self.max_age_s
            except OSError:  # another request pruned it first
                continue
            if expired:
                shutil.rmtree(old.parent, ignore_errors=True)


SLIDER_LABEL = "Before / after (drag the bar)"
PREVIEW_SIDE = 2048  # the slider's images at most this long: the full result is the PNG to download


def slider_pair(source: Image.Image, result: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Before (the input drawn with hard pixels, nearest) and after, at the same size, at most PREVIEW_SIDE long,
    so the slider compares like with like and a large result is not encoded twice at full size."""
    factor = min(1.0, PREVIEW_SIDE / max(result.size))
    size = (max(1, round(result.width * factor)), max(1, round(result.height * factor)))
    after = to_8bit(result).convert("RGBA")
    after = after if after.size == size else after.resize(size, Image.Resampling.LANCZOS)
    return to_8bit(source).convert("RGBA").resize(size, Image.Resampling.NEAREST), after


def build_upscale_tab(upscaling: Upscaling, runner: JobRunner) -> UpscaleTab:
    catalog = upscaling.catalog
    pngs = PngFolder()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            image = gr.Image(label="Image to upscale", type="pil", image_mode=None, sources=["upload", "clipboard"],
                             format="png", height=360, elem_id="upscale-input")
            with gr.Row():
                run = gr.Button("Upscale", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
            upscaler = gr.Dropdown(catalog.choices(), value=catalog.default, label="Upscaler",
                                   info="Real-ESRGAN files are fetched on first use; the embedded one works offline.")
            scale = gr.Slider(MIN_SCALE, MAX_SCALE, value=4, step=0.25, label="Scale",
                              info="Native passes of the model, then a Lanczos resize to the exact size.")
            denoise = gr.Slider(0, 1, value=0.5, step=0.05, label="Denoise strength",
                                info="realesr-general-x4v3 only: 1 removes the most noise, 0 keeps the grain.",
                                visible=catalog.get(catalog.default).has_denoise)
            tile = WholeNumber(value=AUTOMATIC_TILE, minimum=AUTOMATIC_TILE, label="Tile size (px)",
                               info="-1: chosen from the free memory. 0: the whole image at once. Tiles overlap and "
                                    "are blended, so they leave no seams.")
            # only where a face restorer's files are present (never downloaded for you): hidden otherwise
            restorers = upscaling.faces.names if upscaling.faces else []
            with gr.Row(visible=bool(restorers), elem_id="face-restoration"):
                face_restoration = gr.Dropdown([NO_FACE_RESTORATION, *restorers], value=NO_FACE_RESTORATION,
                                               allow_custom_value=True,  # our check names the missing files
                                               label="Face restoration", info="After the upscale, as A1111's extras")
                face_visibility = gr.Slider(0, 1, value=1, step=0.05, label="Face visibility", visible=False,
                                            info="1: the restored faces; lower blends the upscaled ones back in")
        with gr.Column(scale=6):
            slider = gr.ImageSlider(label=SLIDER_LABEL, type="pil", format="png", max_height=620,
                                    interactive=False, elem_id="upscale-slider")
            result_file = gr.File(label="Upscaled PNG (with the input's parameters)", interactive=False,
                                  elem_id="upscale-file")

    # The one map from the settings' components to the request's fields (gradio's inputs_kwargs): the handlers and
    # the API's parameters take these names, in this order, after the image.
    form = dict(upscaler=upscaler, scale=scale, tile=tile, denoise_strength=denoise, face_restoration=face_restoration,
                face_visibility=face_visibility)

    def check(image, request: gr.Request, **fields):
        problems = check_upscale(form_request(**fields), catalog, upscaling.faces)
        if image is None:
            problems.insert(0, "Upload an image first.")
        if problems:
            raise user_error(InvalidRequest(problems), "Check the settings")
        runner.submitted(request, TAB)

    on_device = runner.device_function("upscale", upscaling)

    def upscale_in_page(image, request: gr.Request, progress=gr.Progress(), **fields):
        if image is None:
            raise user_error(InvalidRequest(["Upload an image first."]), "Cannot upscale")
        yield from upscale_image(image, form_request(**fields), request, progress, in_page=True)

    def upscale(image, request: gr.Request, progress=gr.Progress(), **fields):
        """Upscale an image file 1× to 8×. `tile`: input pixels per tile side, 0 for none, -1 to choose from the
        free memory. `face_restoration`: "None", or a face restorer whose files are present (GFPGANv1.4), run on
        the upscaled image at `face_visibility`. Returns the before/after pair and the PNG (the input's parameters
        kept, plus A1111's `Postprocess upscale by` and `Postprocess upscaler`). Client.submit also sees the tiles
        fill in (a small before/after pair per look) when the image is upscaled in tiles."""
        if image is None:
            raise user_error(InvalidRequest(["Give an image file to upscale."]), "Cannot upscale")
        try:  # decoded here rather than by gradio, so that a file that is not an image is refused with the reason
            opened = open_image(image, "image", upscaling.limits.max_input_pixels)
        except StudioError as error:
            raise user_error(error, "Cannot use this file") from None
        yield from upscale_image(opened, form_request(**fields), request, progress, in_page=False)

    def upscale_image(image: Image.Image, wanted: UpscaleRequest, request: gr.Request, progress, in_page: bool):
        """The job as a generator: the tiles filling in, then the result. In the page the slider's label says
        where it is while they fill in (the progress bar would hide them); the API gets plain pairs."""

        def slider(pair, label=SLIDER_LABEL):
            return gr.ImageSlider(value=pair, label=label) if in_page else pair

        def filling_in(pair, caption, part):
            return slider(pair, f"Before / after: {caption}"), gr.skip()

        def upscaled(plan, result):
            for warning in result.warnings:
                gr.Warning(warning)
            if result.image is None:
                gr.Info("Stopped: no image.")
                return slider(None), None  # no half-made image left shown
            return slider(slider_pair(image, result.image)), pngs.save(result.image)

        yield from runner.stream_job(TAB, request, progress, upscaling, lambda: upscaling.plan(image, wanted),
                                     on_device, "Cannot upscale", filling_in, upscaled,
                                     shown=lambda preview: slider_pair(image, preview))

    gpu_event = dict(concurrency_id="gpu", concurrency_limit=runner.concurrency, show_progress_on=[slider])
    outputs = [slider, result_file]
    checked = run.click(check, image, None, inputs_kwargs=form, **QUICK)
    # the last upscale's PNG goes as the new one starts (its tiles fill the slider); a failed job leaves neither
    # half-made tiles nor the last PNG beside its message
    checked.success(lambda: None, None, result_file, **INSTANT)
    event = checked.success(upscale_in_page, image, outputs, inputs_kwargs=form, api_visibility="private", **gpu_event)
    event.failure(lambda: (gr.ImageSlider(value=None, label=SLIDER_LABEL), None), None, outputs, **INSTANT)
    # The API takes a plain file that the studio decodes: gr.Image would decode it first, and a file that is not an
    # image would fail there with gradio's "upstream app has raised an exception" and no word on what is wrong.
    api_image = gr.File(label="Image to upscale", visible=False)
    gr.Button(visible=False).click(upscale, api_image, outputs, inputs_kwargs=form, api_name="upscale", **gpu_event)
    runner.wire_stop(stop, TAB)
    upscaler.input(lambda name: gr.Slider(visible=catalog.get(name).has_denoise), upscaler, denoise, **INSTANT)
    face_restoration.input(lambda name: gr.Slider(visible=name != NO_FACE_RESTORATION), face_restoration,
                           face_visibility, **INSTANT)
    return UpscaleTab(image, event)

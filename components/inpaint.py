"""The Inpaint tab: redo part of an image from a painted mask or coloured strokes, or make an image from a sketch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from components.control_units import (
    build_control_units,
    form_control_units,
    map_of,
    optional_control_images,
    split_control_fields,
)
from components.editor_bridge import (
    APPLY_EDITOR_UPDATE_JS,
    TAKE_MEASURED_UPLOAD_JS,
    UPLOAD_SIZE_JS,
    brush_props,
    select_brush_js,
    editor_files,
    editor_images,
    file_for_page,
    image_size,
    parse_measured_size,
)
from components.canvas_settings import build_canvas_settings, canvas_fields, canvas_values, placed_sides
from components.event_options import INSTANT, QUICK
from components.flow_settings import build_flow_settings, flow_fields, flow_updates, optional_flow_settings
from components.history import build_history
from components.lora_picker import build_lora_picker
from components.preset_picker import (
    build_model_availability,
    chosen_preset,
    preset_card,
    prompt_hint,
    shown_hint,
    sampling_updates,
)
from components.live_preview import build_live_preview_settings, live_preview_fields
from components.running import (
    JobRunner,
    chosen_result,
    gallery_outputs,
    gallery_preview,
    scroll_to_results_in_a_narrow_window,
    user_error,
)
from components.whole_numbers import WholeNumber, WholeSlider
from studio.models.families import samplers_for
from studio.core.errors import InvalidRequest, StudioError
from studio.core.images import open_image
from studio.tasks.control import sketch_unit
from studio.tasks.inpainting import (
    INPAINT_AREAS,
    MAX_MASK_BLUR,
    MAX_PADDING,
    SKETCH_COLOURS,
    SKETCH_STRENGTH,
    WHOLE_PICTURE,
    Inpainter,
    InpaintRequest,
    inpaint_request_from_parameters,
    mask_tools_for,
    sketch_mask,
)
from studio.tasks.previews import DEFAULT_PREVIEW_EVERY, TAESD
from studio.tasks.requests import MAX_CLIP_SKIP, whole

TAB = "inpaint"

INPAINT, SKETCH, SKETCH_TO_IMAGE = "Inpaint", "Inpaint sketch", "Sketch to image"
MODES = (INPAINT, SKETCH, SKETCH_TO_IMAGE)


def default_strength(chosen_mode: str, preset, sketch_guided: bool = False) -> float:
    """Inpainting models repaint best from noise (or at their checkpoint's own strength, e.g. SDXL's 0.99);
    sketches must survive, so they are only partly re-noised (SKETCH_STRENGTH), unless a sketch ControlNet holds
    the drawing's shapes (`sketch_guided`): then from noise, the colours from the prompt."""
    if chosen_mode == INPAINT:
        return preset.inpaint_strength
    return 1.0 if chosen_mode == SKETCH_TO_IMAGE and sketch_guided else SKETCH_STRENGTH


# Each mode's strokes mean something else (a mask, paint over the image, a drawing), so switching mode clears
# them, as A1111 keeps each in a tab of its own; the image stays.
STROKES_ARE_CLEARED = " Switching mode clears the strokes (the image stays): each mode's strokes are its own."
MODE_HELP = {
    INPAINT: "Upload an image, paint over the part to redo, and describe what goes there." + STROKES_ARE_CLEARED,
    SKETCH: "Upload an image and paint on it in colour: the strokes are painted in, and the area they cover is "
            "redrawn at the denoising strength, keeping their colours and shapes." + STROKES_ARE_CLEARED,
    SKETCH_TO_IMAGE: "Draw with coloured brushes on the blank canvas (or over an image): the whole picture is redrawn "
                     "at the denoising strength. Empty areas count as white paper." + STROKES_ARE_CLEARED,
}
PROMPT_PLACEHOLDER = {
    INPAINT: "what goes in the painted area",
    SKETCH: "what the strokes become, e.g. a red square",
    SKETCH_TO_IMAGE: "what the drawing shows, e.g. a red square on a white background",
}
SKETCH_CANVAS = (512, 512)


def brush(chosen_mode: str, radius: int | str = "auto") -> gr.Brush:
    """The mask brush (see-through magenta: what it covers stays visible) or the coloured sketch brush. Its
    radius is in the image's pixels; gradio's "auto" is a fixed 25, so it is set from the image's size."""
    if chosen_mode == INPAINT:
        return gr.Brush(colors=[("#ff00ff", 0.5)], color_mode="fixed", default_size=radius)
    return gr.Brush(colors=list(SKETCH_COLOURS), default_color=SKETCH_COLOURS[0], color_mode="defaults",
                    default_size=radius)



def sketch_controlnet_of(engine: Inpainter, preset):
    """The ControlNet Sketch to image guides with for the preset's family (None: plain image to image)."""
    return engine.controlnets.for_sketches(preset.family)


def sketch_controlnet_info(engine: Inpainter, preset) -> str:
    controlnet = sketch_controlnet_of(engine, preset)
    if controlnet is None:
        return ""
    return (f"{controlnet.label}: the shapes and their places come from your drawing, the colours from the prompt "
            "(at denoising strength 1). Off: image to image from the drawing, its colours kept.")


def sketch_controlnet_checkbox(engine: Inpainter, preset, chosen_mode: str, value=None) -> gr.Checkbox:
    """Shown in Sketch to image for a preset whose family has a sketch ControlNet."""
    return gr.Checkbox(visible=chosen_mode == SKETCH_TO_IMAGE and sketch_controlnet_of(engine, preset) is not None,
                       info=sketch_controlnet_info(engine, preset), **({} if value is None else {"value": value}))


@dataclass
class InpaintTab:
    editor: gr.ImageEditor
    mode: gr.Radio
    image_outputs: list  # what image_updates returns updates for
    image_updates: Callable  # (image, mode) -> updates: the image in the editor, tools fitted (for Send to Inpaint)
    apply_to_editor: Callable  # (event) -> None: after an event that returned image_updates, the page applies them
    generate_event: gr.events.Dependency
    fit_to_preset: Callable  # (demo) -> None: fits the settings to the selected preset on page load
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    gallery: gr.Gallery
    selected: gr.State  # index of the result last clicked (0 until one is)
    send_to_upscale: gr.Button


def form_request(prompt, negative_prompt, preset, scheduler, steps, guidance_scale, strength, mask_blur, inpaint_area,
                 padding, seed, batch_size, clip_skip=1, sketch_controlnet=False, live_preview=TAESD,
                 preview_every=DEFAULT_PREVIEW_EVERY, distilled_guidance=None, shift=None,
                 controls=(), **canvas) -> InpaintRequest:
    return InpaintRequest(
        prompt=prompt or "", negative_prompt=negative_prompt or "", preset=preset, scheduler=scheduler,
        steps=whole(steps), guidance_scale=float(guidance_scale), strength=float(strength), mask_blur=whole(mask_blur),
        inpaint_area=inpaint_area, padding=whole(padding), seed=whole(seed) if seed is not None else -1,
        batch_size=whole(batch_size), clip_skip=whole(clip_skip) if clip_skip is not None else 1,
        sketch_controlnet=bool(sketch_controlnet), **live_preview_fields(live_preview, preview_every),
        **flow_fields(distilled_guidance, shift), controls=controls, **canvas_fields(**canvas),
    )


def painted_mask(layers: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """White where any layer has paint: the union of the layers' alpha (the RGB under it is arbitrary)."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        if layer is not None and layer.size == tuple(size):
            mask |= np.asarray(layer.convert("RGBA").getchannel("A")) > 0
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def images_for(editor: gr.ImageEditor, chosen_mode: str, sent, max_pixels: int):
    """(image, mask) for the engine from the editor's value as the page sent it (see editor_bridge); mask None
    for Sketch to image. Inpaint sketch repaints one brush width around its strokes too (sketch_mask), so that the
    sketch replaces what it covers without a ghost."""
    value = editor_images(editor, sent, max_pixels)
    background, layers, composite = value.get("background"), value.get("layers") or [], value.get("composite")
    if chosen_mode == SKETCH_TO_IMAGE:
        if composite is None:
            raise user_error(InvalidRequest(["Draw a sketch first."]), "Nothing to work from")
        return composite, None
    if background is None:
        raise user_error(InvalidRequest(["Upload an image first (or choose Sketch to image to draw on a blank "
                                         "canvas)."]), "Nothing to inpaint")
    mask = painted_mask(layers, background.size)
    return (composite, sketch_mask(mask)) if chosen_mode == SKETCH else (background, mask)


def build_inpaint_tab(engine: Inpainter, runner: JobRunner) -> InpaintTab:
    default = engine.presets.get(engine.presets.default)
    limits = engine.limits

    with gr.Row(equal_height=False):
        with gr.Column(scale=6):
            mode = gr.Radio(list(MODES), value=INPAINT, label="Mode")
            mode_help = gr.Markdown(MODE_HELP[INPAINT], elem_id="inpaint-mode-help")
            editor = gr.ImageEditor(
                label="Image", type="pil", image_mode="RGBA", format="png", sources=["upload", "clipboard"],
                brush=brush(INPAINT, mask_tools_for(SKETCH_CANVAS).brush_radius), layers=False, transforms=(),
                canvas_size=SKETCH_CANVAS, height=520, elem_id="inpaint-editor",
            )
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=PROMPT_PLACEHOLDER[INPAINT],
                                elem_id="inpaint-prompt")
            prompt_note = shown_hint(prompt_hint(engine, default.name, ""), elem_classes="prompt-hint")
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=1, placeholder="what to avoid")
            lora_picker = build_lora_picker(engine.loras, prompt, engine.loras_that_fit(default.name))
            preset = gr.Dropdown([(p.label, p.name) for p in engine.presets], value=default.name,
                                 label="Model preset", allow_custom_value=True)
            card = gr.Markdown(preset_card(default))
            availability = build_model_availability(engine, default, "inpaint")
            with gr.Accordion("Settings", open=True):
                with gr.Row():
                    scheduler = gr.Dropdown(list(samplers_for(default)), value=default.default_scheduler,
                                            label="Scheduler", allow_custom_value=True)
                    steps = WholeSlider(1, limits.max_steps, value=default.default_steps, step=1, label="Steps")
                with gr.Row():
                    guidance_scale = gr.Slider(0, limits.max_guidance, value=default.inpaint_default_guidance, step=0.5,
                                               label="CFG scale")
                    strength = gr.Slider(0.01, 1, value=default_strength(INPAINT, default), step=0.01,
                                         label="Denoising strength")
                flow = build_flow_settings(default, inpaint=True)
                sketch_controlnet = gr.Checkbox(
                    True, label="Guide with the sketch ControlNet", elem_id="sketch-controlnet",
                    visible=False, info=sketch_controlnet_info(engine, default))
                with gr.Group() as mask_settings:
                    inpaint_area = gr.Radio(list(INPAINT_AREAS), value=WHOLE_PICTURE, label="Inpaint area")
                    with gr.Row():
                        # both follow the image's size when one is loaded (A1111's 4 and 32 are for 512 px)
                        mask_blur = WholeSlider(0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur, pixels")
                        padding = WholeSlider(0, MAX_PADDING, value=32, step=1,
                                              label="Padding around the mask (Only masked), pixels")
                with gr.Row():
                    seed = WholeNumber(-1, label="Seed (-1 = random)")
                    batch_size = WholeSlider(1, limits.max_batch_size, value=1, step=1, label="Batch size")
                    clip_skip = WholeSlider(1, MAX_CLIP_SKIP, value=default.default_clip_skip, step=1,
                                            label="Clip skip", info="2 for anime models; SD 1.x only")
                live_preview, preview_every = build_live_preview_settings(limits.max_steps, "inpaint-live-preview")
            with gr.Group() as canvas_group:  # Inpaint's and Inpaint sketch's, not Sketch to image's
                canvas = build_canvas_settings()
            controls = build_control_units(engine.controlnets, limits.max_control_units,
                                           engine.controlnets.for_family(default.family), limits.max_upload_pixels,
                                           engine.preprocessor_weights,
                                           own_image="the picture", elem_prefix="inpaint-control")
        # The action sits on top of the results, as in A1111: the editor fills the other column, and the button
        # under it was out of view. The column stays in view while the settings scroll; in a narrow window, where
        # the columns stack, the buttons stay at the bottom of the screen (CSS: #inpaint-results, #inpaint-actions).
        with gr.Column(scale=5, elem_id="inpaint-results"):
            with gr.Row(elem_id="inpaint-actions"):
                generate = gr.Button("Inpaint", variant="primary", scale=3, elem_id="inpaint-generate")
                stop = gr.Button("Stop", variant="stop", scale=1)
            gallery = gr.Gallery(label="Results", format="png", columns=2, height=420, object_fit="contain",
                                 buttons=["download", "fullscreen"], interactive=False, elem_id="inpaint-gallery")
            with gr.Row():
                # A1111's "Send to inpaint" under img2img's results: outpaint again, or inpaint the result
                use_result = gr.Button("Use as the image", size="sm", elem_id="inpaint-use-result")
                send_to_upscale = gr.Button("Send to Upscale", size="sm", elem_id="inpaint-send-to-upscale")
            selected = gr.State(0)
            info = gr.Textbox(label="Generation info", lines=3, interactive=False, buttons=["copy"],
                              elem_id="inpaint-generation-info")
            seeds = gr.JSON(label="Used seeds")
            history = build_history("inpaint-history-gallery")

    # The one map from the settings' components to the request's fields: handlers take them by name (gradio's
    # inputs_kwargs), and the API's parameters are these names, in this order. Sketch to image has no mask.
    form = dict(prompt=prompt, negative_prompt=negative_prompt, preset=preset, scheduler=scheduler, steps=steps,
                guidance_scale=guidance_scale, strength=strength, mask_blur=mask_blur, inpaint_area=inpaint_area,
                padding=padding, seed=seed, batch_size=batch_size, clip_skip=clip_skip,
                sketch_controlnet=sketch_controlnet, live_preview=live_preview, preview_every=preview_every,
                distilled_guidance=flow.distilled_guidance, shift=flow.shift, **canvas.fields, **controls.fields)
    sketch_form = {name: component for name, component in form.items()
                   if name not in ("mask_blur", "inpaint_area", "padding", *canvas.fields)}
    inpaint_form = {name: component for name, component in form.items() if name != "sketch_controlnet"}
    settings = list(form.values())

    def request_of(fields: dict, chosen_mode: str = INPAINT, **defaults) -> InpaintRequest:
        """The request the settings make, its ControlNet units' images opened (a clear message if one cannot be).
        Sketch to image has no outpaint or soft inpainting: their hidden settings are left out."""
        plain, units = form_control_units(fields, limits.max_upload_pixels)
        if chosen_mode == SKETCH_TO_IMAGE:
            plain = {name: value for name, value in plain.items() if name not in canvas.fields}
        return form_request(**(defaults | plain), controls=units)

    def check(chosen_mode, value, request: gr.Request, **fields):
        """Instant feedback in the browser, before the request waits in the GPU queue."""
        image, mask = images_for(editor, chosen_mode, value, engine.limits.max_upload_pixels)
        settings_request = request_of(fields, chosen_mode)
        problems = engine.problems(settings_request, "img2img" if chosen_mode == SKETCH_TO_IMAGE else "inpaint")
        outpainting = settings_request.outpaint is not None
        if outpainting and not problems:  # the canvas against the limit, before the job waits in the queue
            problems |= engine.canvas_problems(settings_request, image.size)
        if mask is not None and not outpainting and not np.asarray(mask).any():
            problems["mask"] = ("Paint over the part of the image to redo first." if chosen_mode == INPAINT
                                else "Paint some strokes on the image first.")
        if problems:
            raise user_error(InvalidRequest(list(problems.values())), "Check the settings")
        runner.submitted(request, TAB)

    check = runner.remembering_refusals(TAB, check)
    on_device = runner.device_function("inpaint", engine)
    max_upload = engine.limits.max_upload_pixels

    def run(request, progress, image, mask, settings_request, error_title, sketch=False):
        """Inpaint `image` where `mask` is white (None: an outpaint's new area only), or (`sketch`) sketch to image,
        as this tab's job: a generator
        of the live previews' outputs (an inpaint's pasted into the picture, where the edit goes), then the
        result's (Client.submit sees the previews, predict the result)."""
        if sketch:
            yield from runner.stream(TAB, request, progress, engine,
                                     lambda: engine.plan_sketch(image, settings_request), on_device,
                                     error_title=error_title)
            return
        finishing = {}

        def plan():
            plan_, finishing["it"] = engine.plan_inpaint(image, mask, settings_request)
            return plan_

        yield from runner.stream_job(
            TAB, request, progress, engine, plan, on_device, error_title, gallery_preview,
            lambda plan_, result: gallery_outputs(engine.finish_inpaint(finishing["it"], result), plan_.batch_size),
            shown=lambda preview: finishing["it"].preview_in_picture(preview))

    def opened(path, what):
        try:
            return open_image(path, what, max_upload)
        except StudioError as error:
            raise user_error(error, "Cannot use this file") from None

    def inpaint_from_editor(chosen_mode, value, request: gr.Request, progress=gr.Progress(), **fields):
        image, mask = images_for(editor, chosen_mode, value, engine.limits.max_upload_pixels)
        settings_request = request_of(fields, chosen_mode)
        title = "Cannot generate" if mask is None else "Cannot inpaint"
        yield from run(request, progress, image, mask, settings_request, title, sketch=chosen_mode == SKETCH_TO_IMAGE)

    def inpaint(image, mask=None, request: gr.Request = None, progress=gr.Progress(), **fields):
        """Repaint the white part of `mask` (an image the size of `image`; in a transparent PNG, the opaque part)
        as the prompt describes. Pixels outside the (blurred) mask are returned unchanged, at the input's size.
        outpaint_left/right/top/bottom > 0: the canvas grows by those pixels, the new area filled (outpaint_fill)
        and repainted; the mask is then optional. soft_inpainting: A1111's soft inpainting (soft_* its settings).
        Returns the images (PNG with A1111 parameters), the seeds used and the generation info. control_<n>_*:
        ControlNet unit n; a unit without an image reads the image being inpainted. live_preview (Off, Fast, TAESD:
        Fast where the model has no TAESD) every preview_every steps: the picture as the edit forms in it,
        intermediate outputs for Client.submit."""
        settings_request = request_of(fields)
        if image is None or (mask is None and settings_request.outpaint is None):
            raise user_error(InvalidRequest(["Give both an image and a mask (white = repaint), or an outpaint "
                                             "(outpaint_left/right/top/bottom): then the mask may be left out."]),
                             "Cannot inpaint")
        chosen_mask = opened(mask, "mask") if mask is not None else None
        yield from run(request, progress, opened(image, "image"), chosen_mask, settings_request, "Cannot inpaint")

    optional_control_images(inpaint, controls.count)  # the API may leave a unit's image out
    optional_flow_settings(inpaint)  # empty: the model's own

    def sketch_to_image(sketch, request: gr.Request, progress=gr.Progress(), **fields):
        """An image from a coloured sketch (transparent areas count as white paper), redrawn at the denoising
        strength. With sketch_controlnet, the preset family's sketch ControlNet (the embedded one) also holds the
        drawing's shapes and places (use strength 1: the colours then come from the prompt). control_<n>_*:
        ControlNet unit n; a unit without an image reads the sketch. Returns the images (PNG with A1111
        parameters), the seeds used and the generation info; live previews as /inpaint's."""
        settings_request = request_of(fields, SKETCH_TO_IMAGE, mask_blur=4, inpaint_area=WHOLE_PICTURE, padding=32)
        if sketch is None:
            raise user_error(InvalidRequest(["Give a sketch image."]), "Cannot generate")
        yield from run(request, progress, opened(sketch, "sketch"), None, settings_request, "Cannot generate",
                       sketch=True)

    optional_control_images(sketch_to_image, controls.count)  # the API may leave a unit's image out
    optional_flow_settings(sketch_to_image)  # empty: the model's own

    # The editor is never an input or output of a server event, only of events that run in the browser
    # (js=...): gradio 6.31 re-reads every component that an event with a status has touched at each status
    # update of any event, and reading an ImageEditor makes the browser export and upload its image and every
    # layer. With the editor in Inpaint's inputs, each progress tick of any later job (10 a second) uploaded the
    # picture again: a 64 px image took 5-10 s from Generate. And an editor update makes it report an "upload",
    # so a server handler that read it and set its brush ran in a loop. So the page copies the editor's value into
    # `from_editor` when a handler needs it, applies `to_editor` to it, and measures an uploaded image itself.
    from_editor = gr.JSON(visible="hidden", elem_id="inpaint-from-editor")  # the editor's files, as sent
    to_editor = gr.JSON(visible="hidden", elem_id="inpaint-to-editor")  # {"value"?, "brush"}, applied by the page
    upload_size = gr.Textbox(visible="hidden", elem_id="inpaint-upload-size")  # "WxH#n", written by the page
    fitted_to = gr.State(None)  # the (width, height) the brush, blur and padding were last fitted to

    select_brush = select_brush_js("inpaint-editor", SKETCH_TO_IMAGE)

    def read_editor(event_listener, **options):
        """`event_listener` (e.g. generate.click) copying the editor's value into from_editor, in the browser."""
        return event_listener(None, editor, from_editor, js="(value) => value", **INSTANT, **options)

    def apply_to_editor(event) -> None:
        """After `event` wrote to_editor: the page applies it to the editor (and picks the brush, where it draws)."""
        applied = event.success(None, to_editor, editor, js=APPLY_EDITOR_UPDATE_JS, **INSTANT)
        applied.then(None, [mode, to_editor], None, js=select_brush, **INSTANT)

    def image_updates(image, chosen_mode):
        """The editor showing `image` (no strokes; None: a blank canvas) with its brush fitted to it, and blur and
        padding fitted too; for Send to Inpaint and a mode switch. Updates for image_outputs."""
        size = image_size(image) if image is not None else None
        tools = mask_tools_for(size or SKETCH_CANVAS)
        value = None
        if image is not None:
            shown = file_for_page(editor, image)
            value = {"background": shown, "layers": [], "composite": shown}
        update = {"value": value, "brush": brush_props(brush(chosen_mode, tools.brush_radius))}
        return (update, gr.Slider(value=tools.mask_blur) if size else gr.Slider(),
                gr.Slider(value=tools.padding) if size else gr.Slider(), size)

    def fit_tools_to_upload(chosen_mode, measured, fitted):
        """Brush, blur and padding fitted to an uploaded image, from the size the page measured; nothing changes
        when they already fit."""
        size = parse_measured_size(measured)
        if size is None or size == tuple(fitted or ()):
            return gr.skip(), gr.skip(), gr.skip(), fitted
        tools = mask_tools_for(size)
        return ({"brush": brush_props(brush(chosen_mode, tools.brush_radius))}, gr.Slider(value=tools.mask_blur),
                gr.Slider(value=tools.padding), size)

    def sketch_guided(chosen_mode, preset, guide) -> bool:
        return chosen_mode == SKETCH_TO_IMAGE and bool(guide) and sketch_controlnet_of(engine, preset) is not None

    def switch_mode(chosen_mode, sent, preset_name, guide):
        """The mode's help, prompt hint, settings and brush, and the image without the other mode's strokes (the
        uploaded file itself: nothing is decoded)."""
        files = editor_files(sent, engine.limits.max_upload_pixels, editor)
        background = files.background.path if files is not None and files.background is not None else None
        chosen = chosen_preset(engine.presets, preset_name)
        return (
            MODE_HELP[chosen_mode],
            gr.Textbox(placeholder=PROMPT_PLACEHOLDER[chosen_mode]),
            *image_updates(background, chosen_mode),
            gr.Slider(value=default_strength(chosen_mode, chosen, sketch_guided(chosen_mode, chosen, guide))),
            gr.Group(visible=chosen_mode != SKETCH_TO_IMAGE),
            gr.Group(visible=chosen_mode != SKETCH_TO_IMAGE),
            gr.Button(value="Generate" if chosen_mode == SKETCH_TO_IMAGE else "Inpaint"),
            sketch_controlnet_checkbox(engine, chosen, chosen_mode),
        )

    def preset_updates(name, chosen_mode=INPAINT, guide=True):
        chosen = chosen_preset(engine.presets, name)
        return (*sampling_updates(chosen, limits, guidance=chosen.inpaint_default_guidance),
                gr.Slider(value=default_strength(chosen_mode, chosen, sketch_guided(chosen_mode, chosen, guide))),
                gr.Slider(value=chosen.default_clip_skip),
                *flow_updates(chosen, inpaint=chosen_mode != SKETCH_TO_IMAGE),
                sketch_controlnet_checkbox(engine, chosen, chosen_mode))

    # one progress bar, on the results (not one on each output)
    gpu_event = dict(concurrency_id="gpu", concurrency_limit=runner.concurrency, show_progress_on=[gallery])
    outputs = [gallery, seeds, info]
    checked = read_editor(generate.click).success(check, [mode, from_editor], None, inputs_kwargs=form, **QUICK)
    event = checked.success(inpaint_from_editor, [mode, from_editor], outputs, inputs_kwargs=form,
                            api_visibility="private", **gpu_event)
    runner.follow_results(TAB, [checked], [event], seeds, info, gallery)
    scroll_to_results_in_a_narrow_window(checked, "inpaint-gallery")
    runner.wire_stop(stop, TAB)

    def fill_form(text, **fields):
        """The settings an inpainted PNG was made with, back in the form (the image and mask stay as they are)."""
        if not text:
            raise user_error(InvalidRequest(["This image has no generation parameters."]), "No parameters")
        plain, _ = split_control_fields(fields)  # the units come from the PNG (without their images)
        filled, notes = inpaint_request_from_parameters(text, engine.presets, form_request(**plain), engine.loras,
                                                        engine.controlnets)
        for note in notes:
            gr.Warning(note)
        chosen = chosen_preset(engine.presets, filled.preset)
        card_update, scheduler_, steps_, guidance_ = sampling_updates(chosen, limits, filled.scheduler, filled.steps,
                                                                      filled.guidance_scale)
        distilled_, shift_ = flow_updates(chosen, inpaint=True, distilled_guidance=filled.distilled_guidance,
                                          shift=filled.shift)
        return [filled.prompt, filled.negative_prompt, filled.preset, scheduler_, steps_, guidance_, filled.strength,
                filled.mask_blur, filled.inpaint_area, filled.padding, filled.seed, 1, filled.clip_skip,
                # a PNG guided by the sketch ControlNet lists it as a unit: the box stays, the unit is not added twice;
                # a PNG says nothing of previews
                gr.skip(), gr.skip(), gr.skip(), distilled_, shift_, *canvas_values(filled.outpaint, filled.soft),
                *controls.values_for(filled.controls), card_update]

    history.follow([event], gallery)
    controls.refresh_maps(history.on_click(fill_form, form, [*settings, card], **QUICK))
    image_outputs = [to_editor, mask_blur, padding, fitted_to]
    # queued, so that a refusal (an image over the size limit) shows as a toast
    apply_to_editor(read_editor(mode.input).success(
        switch_mode, [mode, from_editor, preset, sketch_controlnet],
        [mode_help, prompt, *image_outputs, strength, mask_settings, canvas_group, generate, sketch_controlnet],
        **QUICK))
    # the page measures an upload itself; the server only hears of a new size
    uploaded = editor.upload(None, None, upload_size, js=TAKE_MEASURED_UPLOAD_JS, **INSTANT)
    uploaded.then(None, [mode], None, js=select_brush, **INSTANT)
    apply_to_editor(upload_size.change(fit_tools_to_upload, [mode, upload_size, fitted_to], image_outputs, **INSTANT))

    def use_as_the_image(gallery_value, index, chosen_mode):
        """The chosen result into the editor (brush fitted), the outpaint's sides back at 0: it has grown."""
        image = chosen_result(gallery_value, index, "There is no result to use yet: make one first.")
        return (*image_updates(image, chosen_mode), *([0] * len(canvas.sides)))

    apply_to_editor(use_result.click(use_as_the_image, [gallery, selected, mode],
                                     [*image_outputs, *canvas.sides.values()], **QUICK))

    def place_on_canvas(fitted, *placement):
        try:
            return placed_sides(fitted, *placement)
        except InvalidRequest as error:
            raise user_error(error, "Cannot place the image") from None

    canvas.place.click(place_on_canvas, [fitted_to, *canvas.placement], list(canvas.sides.values()), **QUICK)

    fit_form = dict(fn=preset_updates, inputs=[preset, mode, sketch_controlnet],
                    outputs=[card, scheduler, steps, guidance_scale, strength, clip_skip, *flow.outputs,
                             sketch_controlnet], **INSTANT)
    preset.input(**fit_form)
    # FLUX.1-dev inpaints with its Fill model (Distilled CFG 30) and draws a sketch with itself (3.5)
    mode.input(lambda chosen_mode, name: flow_updates(chosen_preset(engine.presets, name),
                                                      inpaint=chosen_mode != SKETCH_TO_IMAGE),
               [mode, preset], flow.outputs, **INSTANT)
    sketch_controlnet.input(
        lambda chosen_mode, name, guide: gr.Slider(value=default_strength(
            chosen_mode, chosen_preset(engine.presets, name),
            sketch_guided(chosen_mode, chosen_preset(engine.presets, name), guide))),
        [mode, preset, sketch_controlnet], strength, **INSTANT)

    def own_map(chosen_mode, value, image, *settings):
        """A unit's map of the picture in the editor (the drawing in Sketch to image), or of its own upload."""
        picture = None
        if image is None:
            picture, _ = images_for(editor, chosen_mode, value, limits.max_upload_pixels)
        return map_of(image, picture, *settings, limits.max_upload_pixels, controls.weights_for)

    for index, button in enumerate(controls.own_map_buttons):
        read_editor(button.click).success(own_map, [mode, from_editor, *controls.map_settings(index)],
                                          controls.maps[index], **QUICK)
    for changed in (editor.change, mode.input):  # a map of the picture as it was is not left showing
        controls.clear_own_maps(changed)

    # The API takes plain files: an image and a mask (white = repaint), or a sketch; no editor layers.
    api_image = gr.File(label="Image", visible=False)  # any file: open_image says what is wrong
    api_mask = gr.File(label="Mask (white = repaint)", visible=False)
    api_inpaint, api_sketch = gr.Button(visible=False), gr.Button(visible=False)
    api_inpaint.click(inpaint, [api_image, api_mask], outputs, inputs_kwargs=inpaint_form, api_name="inpaint",
                      **gpu_event)
    api_sketch.click(sketch_to_image, api_image, outputs, inputs_kwargs=sketch_form, api_name="sketch_to_image",
                     **gpu_event)

    # what the model knows, and which typed words it does not, as the user types (no queue: no GPU, no wait)
    def hint(name, text, chosen_mode, guide):
        """The prompt hint; in Sketch to image guided by the sketch ControlNet, its words count as known."""
        chosen = chosen_preset(engine.presets, name)
        controls = (sketch_unit(engine.controlnets, chosen.family),) if sketch_guided(chosen_mode, chosen, guide) \
            else ()
        return shown_hint(prompt_hint(engine, name, text, controls))

    note_event = dict(fn=hint, inputs=[preset, prompt, mode, sketch_controlnet], outputs=prompt_note, **INSTANT)
    prompt.change(**note_event, trigger_mode="always_last")
    for changed in (preset, mode, sketch_controlnet):
        changed.change(**note_event)
    lora_picker.follow(preset, engine.loras_that_fit)
    controls.follow(preset, lambda name: chosen_preset(engine.presets, name).family)
    availability.follow(preset)

    def fit_to_preset(demo: gr.Blocks) -> None:
        # not the sketch ControlNet's box: a page's first answer can come after a quick visitor switched to Sketch
        # to image, and would hide it again (it starts hidden, as the mode starts at Inpaint)
        demo.load(**(fit_form | dict(fn=lambda *values: preset_updates(*values)[:-1],
                                     outputs=fit_form["outputs"][:-1])))
        availability.on_load(demo, preset)
        demo.load(None, js=UPLOAD_SIZE_JS, **INSTANT)  # see fitted_to above

    def remember_selection(selection: gr.SelectData):
        return selection.index

    gallery.select(remember_selection, None, selected, **INSTANT)
    event.then(lambda: 0, None, selected, **INSTANT)  # a new batch: its first image
    return InpaintTab(editor=editor, mode=mode, image_outputs=image_outputs, image_updates=image_updates,
                      apply_to_editor=apply_to_editor,
                      generate_event=event, fit_to_preset=fit_to_preset,
                      prompt=prompt, negative_prompt=negative_prompt, gallery=gallery, selected=selected,
                      send_to_upscale=send_to_upscale)

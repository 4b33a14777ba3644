"""The Text to image tab."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from components.control_units import (
    build_control_units,
    form_control_units,
    optional_control_images,
    split_control_fields,
)
from components.event_options import INSTANT, QUICK
from components.history import build_history
from components.flow_settings import build_flow_settings, flow_fields, flow_updates, optional_flow_settings
from components.live_preview import build_live_preview_settings, live_preview_fields
from components.lora_picker import build_lora_picker
from components.preset_picker import (
    build_model_availability,
    chosen_preset,
    preset_card,
    prompt_hint,
    shown_hint,
    sampling_updates,
)
from components.running import JobRunner, scroll_to_results_in_a_narrow_window, user_error
from components.whole_numbers import WholeNumber, WholeSlider
from studio.models.families import samplers_for
from studio.core.errors import InvalidRequest, StudioError
from studio.tasks.control import ControlUnit
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.hires import (
    DEFAULT_HIRES_UPSCALER,
    LATENT_UPSCALE_MODES,
    MAX_HIRES_SCALE,
    MIN_HIRES_SCALE,
    HiresFix,
    hires_size,
)
from studio.tasks.parameters import request_from_parameters
from studio.tasks.previews import DEFAULT_PREVIEW_EVERY, TAESD
from studio.tasks.requests import MAX_CLIP_SKIP, whole

TAB = "text-to-image"



@dataclass
class TextToImageTab:
    generate_event: gr.events.Dependency
    gallery: gr.Gallery
    selected: gr.State  # index of the gallery image last clicked (0 until one is)
    send_to_inpaint: gr.Button
    send_to_upscale: gr.Button
    fit_to_preset: Callable  # (demo) -> None: narrows the sliders to the selected preset on page load
    prompt: gr.Textbox
    negative_prompt: gr.Textbox


def form_request(prompt, negative_prompt, preset, scheduler, steps, guidance_scale, width, height, seed, batch_size, style,
             clip_skip=1, hires_fix=False, hires_upscaler=DEFAULT_HIRES_UPSCALER, hires_upscale=2.0, hires_steps=0,
             denoising_strength=0.5, live_preview=TAESD, preview_every=DEFAULT_PREVIEW_EVERY, distilled_guidance=None,
             shift=None, controls=()):
    hires = None
    if hires_fix:
        defaults = HiresFix()  # an API caller's null is the default, as for the other fields
        hires = HiresFix(upscale=defaults.upscale if hires_upscale is None else float(hires_upscale),
                         upscaler=hires_upscaler or defaults.upscaler,
                         steps=defaults.steps if hires_steps is None else whole(hires_steps),
                         denoising_strength=defaults.denoising_strength if denoising_strength is None
                         else float(denoising_strength))
    return TextToImageRequest(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        preset=preset,
        scheduler=scheduler,
        steps=whole(steps),
        guidance_scale=float(guidance_scale),
        width=whole(width),
        height=whole(height),
        seed=whole(seed) if seed is not None else -1,
        batch_size=whole(batch_size),
        style=style or "None",
        clip_skip=whole(clip_skip) if clip_skip is not None else 1,
        hires=hires,
        **live_preview_fields(live_preview, preview_every),
        **flow_fields(distilled_guidance, shift),
        controls=controls,
    )


def hires_note(preset: str, width, height, upscale, presets) -> str:
    """What Hires. fix will make, shown under its settings."""
    try:
        step = presets.get(preset).size_step
        target = hires_size(int(width), int(height), float(upscale), step)
    except (KeyError, TypeError, ValueError, StudioError):
        return ""
    return f"Generates {int(width)}×{int(height)}, then upscales to **{target[0]}×{target[1]}** and refines it."


def size_slider(preset, value) -> gr.Slider:
    """A width or height slider over the preset's sizes. A preset of one size (SD-Turbo's 512) gets it fixed:
    gradio refuses a slider whose minimum is its maximum (picking the preset logged a traceback)."""
    if preset.min_size == preset.max_size:
        return gr.Slider(minimum=preset.min_size - preset.size_step, maximum=preset.max_size, step=preset.size_step,
                         value=preset.max_size, interactive=False)
    return gr.Slider(minimum=preset.min_size, maximum=preset.max_size, step=preset.size_step, value=value,
                     interactive=True)


def build_text_to_image_tab(engine: TextToImage, runner: JobRunner) -> TextToImageTab:
    """`runner` runs each request as a job of this tab (Stop, progress, the GPU function)."""
    default = engine.presets.get(engine.presets.default)
    limits = engine.limits
    # Gradio rejects slider values outside a slider's range before our validator can explain why, so the
    # ranges start wide enough for every preset and are narrowed to the chosen preset in the browser.
    min_size = min(p.min_size for p in engine.presets)
    max_size = max(p.max_size for p in engine.presets)

    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red circle on a blue background", autofocus=True)
            prompt_note = shown_hint(prompt_hint(engine, default.name, ""), elem_classes="prompt-hint")
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=1, placeholder="what to avoid")
            lora_picker = build_lora_picker(engine.loras, prompt, engine.loras_that_fit(default.name))
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
            with gr.Row():
                preset = gr.Dropdown(
                    [(p.label, p.name) for p in engine.presets], value=default.name, label="Model preset", scale=3,
                    allow_custom_value=True,  # unknown names reach our validator, which lists the real ones
                )
                style = gr.Dropdown(engine.styles.names, value="None", label="Style", scale=2, allow_custom_value=True)
            card = gr.Markdown(preset_card(default))
            availability = build_model_availability(engine, default, "text2img")
            with gr.Accordion("Settings", open=True):
                with gr.Row():
                    scheduler = gr.Dropdown(
                        list(samplers_for(default)), value=default.default_scheduler, label="Scheduler",
                        allow_custom_value=True,  # the API may ask for LCM with an LCM preset
                    )
                    steps = WholeSlider(1, limits.max_steps, value=default.default_steps, step=1, label="Steps")
                guidance_scale = gr.Slider(0, limits.max_guidance, value=default.default_guidance, step=0.5,
                                           label="CFG scale")
                flow = build_flow_settings(default)
                with gr.Row():
                    width = WholeSlider(min_size, max_size, value=default.default_width, step=8, label="Width")
                    height = WholeSlider(min_size, max_size, value=default.default_height, step=8, label="Height")
                with gr.Row():
                    seed = WholeNumber(-1, label="Seed (-1 = random)", scale=3)
                    random_seed = gr.Button("Random", scale=1, min_width=80)
                    reuse_seed = gr.Button("Reuse last", scale=1, min_width=80)
                    batch_size = WholeSlider(1, limits.max_batch_size, value=1, step=1, label="Batch size", scale=3)
                clip_skip = WholeSlider(1, MAX_CLIP_SKIP, value=default.default_clip_skip, step=1, label="Clip skip",
                                        info="A1111's: 2 reads the text encoder's second-to-last layer (anime "
                                             "models); SD 1.x only")
                live_preview, preview_every = build_live_preview_settings(limits.max_steps, "live-preview")
                hires_fix = gr.Checkbox(False, label="Hires. fix", elem_id="hires-fix",
                                        info="Two passes, as A1111's: generate at this size, upscale, then refine "
                                             "at the larger size (more detail than generating large at once)")
                with gr.Group(visible=False, elem_id="hires-settings") as hires_settings:
                    with gr.Row():
                        hires_upscaler = gr.Dropdown(
                            [(name, name) for name in LATENT_UPSCALE_MODES]
                            + (engine.upscaling.catalog.choices() if engine.upscaling else []),
                            value=DEFAULT_HIRES_UPSCALER, label="Upscaler", scale=3,
                            allow_custom_value=True,  # an unknown name reaches our validator, which lists the real ones
                            info="Latent: the latents enlarged (no model); or an upscaler model on the image",
                        )
                        hires_upscale = gr.Slider(MIN_HIRES_SCALE, MAX_HIRES_SCALE, value=2.0, step=0.05,
                                                  label="Upscale by", scale=2)
                    with gr.Row():
                        hires_steps = WholeSlider(0, limits.max_steps, value=0, step=1, label="Hires steps",
                                                  info="0 = as many as Steps")
                        denoising_strength = gr.Slider(0, 1, value=0.5, step=0.01, label="Denoising strength",
                                                       info="How much the second pass redraws")
                    hires_size_note = gr.Markdown(
                        hires_note(default.name, default.default_width, default.default_height, 2.0, engine.presets),
                        elem_id="hires-size-note")
            controls = build_control_units(engine.controlnets, limits.max_control_units,
                                           engine.controlnets.for_family(default.family), limits.max_upload_pixels,
                                           engine.preprocessor_weights,
                                           elem_prefix="text-control")
            with gr.Accordion("Read parameters from a PNG", open=False):
                png = gr.Image(label="PNG made here or by AUTOMATIC1111", type="pil", image_mode=None,
                               sources=["upload"], format="png", height=200, elem_id="png-parameters-input")
                png_parameters = gr.Textbox(label="Parameters in the file", lines=4, interactive=False)
                use_parameters = gr.Button("Send parameters to the form")
        with gr.Column(scale=6):
            gallery = gr.Gallery(label="Images", format="png", columns=2, height=520, object_fit="contain",
                                 buttons=["download", "fullscreen"], interactive=False,
                                 elem_id="text-to-image-gallery")
            with gr.Row():
                send_to_inpaint = gr.Button("Send to Inpaint", size="sm")
                send_to_upscale = gr.Button("Send to Upscale", size="sm", elem_id="text-send-to-upscale")
            selected = gr.State(0)
            seeds = gr.JSON(label="Used seeds", elem_id="used-seeds")
            info = gr.Textbox(label="Generation info", lines=4, interactive=False, buttons=["copy"],
                              elem_id="generation-info")
            history = build_history("history-gallery")

    # The one map from the form's components to the request's fields: handlers take them by name (gradio's
    # inputs_kwargs), and the API's parameters are these names, in this order.
    form = dict(prompt=prompt, negative_prompt=negative_prompt, preset=preset, scheduler=scheduler, steps=steps,
                guidance_scale=guidance_scale, width=width, height=height, seed=seed, batch_size=batch_size,
                style=style, clip_skip=clip_skip, hires_fix=hires_fix, hires_upscaler=hires_upscaler,
                hires_upscale=hires_upscale, hires_steps=hires_steps, denoising_strength=denoising_strength,
                live_preview=live_preview, preview_every=preview_every, distilled_guidance=flow.distilled_guidance,
                shift=flow.shift, **controls.fields)
    inputs = list(form.values())

    def request_of(fields: dict) -> TextToImageRequest:
        """The request the form's fields make, its ControlNet units' images opened (a clear message if one
        cannot be)."""
        plain, units = form_control_units(fields, limits.max_upload_pixels)
        return form_request(**plain, controls=units)

    def check(request: gr.Request, **fields):
        """Instant feedback in the browser, before the request waits in the GPU queue."""
        problems = engine.problems(request_of(fields))
        if problems:
            raise user_error(InvalidRequest(list(problems.values())), "Check the settings")
        runner.submitted(request, TAB)

    check = runner.remembering_refusals(TAB, check)
    on_device = runner.device_function("text_to_image", engine)

    def text_to_image(request: gr.Request, progress=gr.Progress(), **fields):
        """Generate images from a prompt. Returns the images (PNG with A1111 parameters), the seeds used and the
        generation info. Image i uses seed + i; seed -1 picks a random seed. With hires_fix, each image is
        generated at width × height, upscaled by hires_upscale with hires_upscaler (a latent mode or an upscaler
        preset), then refined at that size at denoising_strength for hires_steps (0 = steps). live_preview (Off,
        Fast, TAESD: Fast where the model has no TAESD) every preview_every steps: the images as they form,
        intermediate outputs for Client.submit. SD 3.5 and FLUX.1: shift (0: the model's own) and FLUX.1-dev's
        distilled_guidance (other models ignore both).
        control_<n>_*: ControlNet unit n, used when control_<n>_enabled: its control image, preprocessor, model
        (one made for the preset's family), weight 0-2, guidance start and end (fractions of the steps),
        control_mode, resize_mode, pixel_perfect, processor_res, and the preprocessor's thresholds (-1: its
        defaults)."""
        text_request = request_of(fields)
        # live previews as the images form (a generator handler: Client.submit sees them, predict the result)
        yield from runner.stream(TAB, request, progress, engine, lambda: engine.plan(text_request), on_device)

    optional_control_images(text_to_image, controls.count)  # the API may leave a unit's image out
    optional_flow_settings(text_to_image)  # empty: the model's own

    def preset_updates(name, scheduler=None, steps=None, guidance=None, width=None, height=None, clip_skip=None,
                       hires_steps_value=None, distilled_guidance=None, shift=None):
        """Card, scheduler, steps, CFG, width, height, clip skip, hires steps, distilled guidance and shift fitted to
        a preset; given values are kept."""
        chosen = chosen_preset(engine.presets, name)
        most_steps = min(chosen.max_steps, limits.max_steps)
        return (
            *sampling_updates(chosen, limits, scheduler, steps, guidance),
            size_slider(chosen, width or chosen.default_width),
            size_slider(chosen, height or chosen.default_height),
            gr.Slider(value=clip_skip or chosen.default_clip_skip),
            gr.Slider(maximum=most_steps, value=min(hires_steps_value or 0, most_steps)),
            *flow_updates(chosen, distilled_guidance=distilled_guidance, shift=shift),
        )

    fitted_to_preset = [card, scheduler, steps, guidance_scale, width, height, clip_skip, hires_steps, *flow.outputs]

    def read_png(image):
        if image is None:
            return ""
        text = image.info.get("parameters")
        return text if isinstance(text, str) and text.strip() else "This image has no generation parameters."

    def send_parameters(text, **fields):
        if not text or text.startswith("This image has no"):
            raise user_error(InvalidRequest(["Drop a PNG with generation parameters first."]), "No parameters")
        # the form, with its hires settings read even while Hires. fix is off (an image without it keeps them)
        plain, _ = split_control_fields(fields)  # the units come from the PNG (without their images)
        current = form_request(**(plain | {"hires_fix": True}))
        filled, notes = request_from_parameters(text, engine.presets, current,
                                                engine.upscaling.catalog if engine.upscaling else None, engine.loras,
                                                engine.controlnets)
        for note in notes:
            gr.Warning(note)
        hires = filled.hires or current.hires
        (card_update, scheduler_, steps_, guidance_, width_, height_, clip_skip_, hires_steps_, distilled_,
         shift_) = preset_updates(filled.preset, filled.scheduler, filled.steps, filled.guidance_scale, filled.width,
                                  filled.height, filled.clip_skip, hires.steps, filled.distilled_guidance, filled.shift)
        return [filled.prompt, filled.negative_prompt, filled.preset, scheduler_, steps_, guidance_, width_, height_,
                filled.seed, 1, "None", clip_skip_, filled.hires is not None, hires.upscaler, hires.upscale,
                hires_steps_, hires.denoising_strength, gr.skip(), gr.skip(),  # a PNG says nothing of previews
                distilled_, shift_, *controls.values_for(filled.controls), card_update]

    # The named endpoint validates too (engine.generate raises InvalidRequest), so API callers get clear errors.
    # The check runs outside the GPU's concurrency group (limit None), so it answers at once even when busy.
    # Jobs share the "gpu" concurrency group; several may be in flight, and they take turns on the device
    # between their images (the memory manager's fair lock), so a quick image is not stuck behind a long batch.
    # one progress bar, on the results (not one on each output)
    gpu_event = dict(concurrency_id="gpu", concurrency_limit=runner.concurrency, show_progress_on=[gallery])
    checked = generate.click(check, None, None, inputs_kwargs=form, **QUICK)
    event = checked.success(text_to_image, None, [gallery, seeds, info], inputs_kwargs=form, api_name="text_to_image",
                            **gpu_event)
    prompt_checked = prompt.submit(check, None, None, inputs_kwargs=form, **QUICK)
    submitted = prompt_checked.success(text_to_image, None, [gallery, seeds, info], inputs_kwargs=form,
                                       api_visibility="private", **gpu_event)
    runner.follow_results(TAB, [checked, prompt_checked], [event, submitted], seeds, info, gallery)
    for started in (checked, prompt_checked):
        scroll_to_results_in_a_narrow_window(started, "text-to-image-gallery")

    history.follow([event, submitted], gallery)
    controls.refresh_maps(history.on_click(send_parameters, form, [*inputs, card], **QUICK))
    runner.wire_stop(stop, TAB)
    # Preset changes only need the preset itself: run them at once, outside the GPU queue.
    fitted = preset.input(preset_updates, preset, fitted_to_preset, **INSTANT)
    random_seed.click(lambda: -1, None, seed, **INSTANT)
    reuse_seed.click(lambda used: used[0] if used else -1, seeds, seed, **INSTANT)
    png.change(read_png, png, png_parameters, **INSTANT)
    hires_fix.change(lambda on: gr.Group(visible=on), hires_fix, hires_settings, **INSTANT)
    # Not on the preset's own change: that fires before the sizes are fitted to the new preset, and gradio would
    # refuse the old width as out of the new range (a traceback in the log). Fitting changes the sizes, or is
    # followed by the note.
    note_of_hires = dict(fn=lambda *values: hires_note(*values, engine.presets),
                         inputs=[preset, width, height, hires_upscale], outputs=hires_size_note, **INSTANT)
    for control in (width, height, hires_upscale):
        control.change(**note_of_hires)
    fitted.then(**note_of_hires)

    def remember_selection(selection: gr.SelectData):
        return selection.index

    gallery.select(remember_selection, None, selected, **INSTANT)
    event.then(lambda: 0, None, selected, **INSTANT)  # a new batch: its first image
    # queued (outside the GPU group), so its notes show as toasts
    controls.refresh_maps(use_parameters.click(send_parameters, png_parameters, [*inputs, card], inputs_kwargs=form,
                                               **QUICK))

    # Each preset's own example prompts; clicking one also selects that preset, since an example only
    # shows what the model that knows it can do (the embedded model knows shapes, not "a cat").
    examples = [[text, p.name] for p in engine.presets for text in p.examples]
    if examples:
        shown = gr.Examples(examples=examples, inputs=[prompt, preset], label="Try a prompt", examples_per_page=12,
                            api_visibility="private")
        # Fit the form to the example's preset (a programmatic change doesn't fire preset.input); wired here
        # rather than with run_on_click, whose event would show progress on the whole form
        shown.load_input_event.then(preset_updates, preset, fitted_to_preset, **INSTANT)
    # what the model knows, and which typed words it does not, as the user types (no queue: no GPU, no wait)
    # (a ControlNet unit that is on makes the words it was trained with known)
    def hint(name, text, *units):
        on, models = units[:controls.count], units[controls.count:]
        chosen = tuple(ControlUnit(model) for enabled, model in zip(on, models) if enabled and model)
        return shown_hint(prompt_hint(engine, name, text, chosen))

    note_event = dict(fn=hint, inputs=[preset, prompt, *controls.enabled, *controls.models], outputs=prompt_note,
                      **INSTANT)
    prompt.change(**note_event, trigger_mode="always_last")
    for changed in (preset, *controls.enabled, *controls.models):
        changed.change(**note_event)
    lora_picker.follow(preset, engine.loras_that_fit)
    controls.follow(preset, lambda name: chosen_preset(engine.presets, name).family)
    availability.follow(preset)

    def fit_to_preset(demo: gr.Blocks) -> None:
        demo.load(lambda name: preset_updates(name), preset, fitted_to_preset, **INSTANT)
        availability.on_load(demo, preset)

    return TextToImageTab(generate_event=event, gallery=gallery, selected=selected, send_to_inpaint=send_to_inpaint,
                          send_to_upscale=send_to_upscale,
                          fit_to_preset=fit_to_preset, prompt=prompt, negative_prompt=negative_prompt)

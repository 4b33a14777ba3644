"""The Compare tab: one prompt over up to three axes (A1111's X/Y/Z plot), run as one job; the labelled grid, every
cell as its own PNG, a table with each cell's time and CLIP score, and any two cells side by side on a slider."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from components.control_units import build_control_units, form_control_units, optional_control_images
from components.event_options import INSTANT, QUICK
from components.lora_picker import build_lora_picker
from components.running import JobRunner, gallery_preview, user_error
from components.whole_numbers import WholeNumber
from studio.core.errors import InvalidRequest, StudioError
from studio.evaluation.axes import AXIS_TYPES, NO_AXIS, build_grid
from studio.evaluation.compare import CompareLimits, ComparePlan, CompareRequest, Comparison
from studio.tasks.requests import whole

TAB = "compare"
AXES = [NO_AXIS, *AXIS_TYPES]
TABLE_HEADERS = ["cell", "seconds", "CLIP score"]


@dataclass
class CompareTab:
    compare_event: gr.events.Dependency


def form_request(prompt, negative_prompt, seed, x_type, x_values, y_type, y_values, z_type, z_values,
                 controls=()) -> CompareRequest:
    return CompareRequest(prompt=prompt or "", negative_prompt=negative_prompt or "",
                          seed=whole(seed) if seed is not None else -1, x_type=x_type or NO_AXIS,
                          x_values=x_values or "", y_type=y_type or NO_AXIS, y_values=y_values or "",
                          z_type=z_type or NO_AXIS, z_values=z_values or "", controls=controls)


def cell_count_note(comparison: Comparison, x_type, x_values, y_type, y_values, z_type, z_values) -> str:
    """The grid's size as the axes are typed, or what is wrong with them."""
    try:
        grid = build_grid([(x_type, x_values), (y_type, y_values), (z_type, z_values)], comparison.choices(),
                          comparison.limits.max_cells)
    except InvalidRequest as error:
        return "⚠ " + " ".join(error.problems)
    x, y, z = grid.shape
    return f"**{grid.cell_count} cell{'s' * (grid.cell_count != 1)}** ({x} × {y}" + (f" × {z}" if z > 1 else "") + ")"


def build_compare_tab(comparison: Comparison, runner: JobRunner) -> CompareTab:
    limits: CompareLimits = comparison.limits
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a blue background")
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=1)
            # every LoRA: a grid's cells may span presets (a Checkpoint axis); each cell checks its own
            build_lora_picker(comparison.text_to_image.loras, prompt, comparison.text_to_image.loras.names)
            seed = WholeNumber(-1, label="Seed (-1 = random; the same for every cell unless Seed is an axis)")
            axes = []
            for name, default_type, default_values in (("X", "Sampler", "Euler, DDIM"), ("Y", "Steps", "10, 20"),
                                                       ("Z", NO_AXIS, "")):
                with gr.Row():
                    axis_type = gr.Dropdown(AXES, value=default_type, label=f"{name} type", scale=3,
                                            allow_custom_value=True)
                    axis_values = gr.Textbox(default_values, label=f"{name} values", scale=5,
                                             placeholder="Euler a, DPM++ 2M Karras · 10-30 (+10) · 5, 7.5")
                axes += [axis_type, axis_values]
            count = gr.Markdown(cell_count_note(comparison, "Sampler", "Euler, DDIM", "Steps", "10, 20", NO_AXIS, ""),
                                elem_id="compare-cell-count")
            gr.Markdown(f"Values as in A1111's X/Y/Z plot: `1-5`, `1-5 (+2)`, `1-10 [5]`, `5, 7.5`, sizes `64x64`; "
                        f"seed -1 is drawn at random. At most {limits.max_cells} cells. Settings not on an axis are "
                        "each cell's preset's defaults. Denoising and Hires upscale switch Hires. fix on (Latent, ×2 "
                        "unless Hires upscale is an axis). The [ControlNet] axes vary the ControlNet unit below.",
                        elem_classes="prompt-hint")
            engine = comparison.text_to_image
            default_family = engine.presets.get(engine.presets.default).family
            controls = build_control_units(engine.controlnets, 1, engine.controlnets.for_family(default_family),
                                           engine.limits.max_upload_pixels, engine.preprocessor_weights,
                                           elem_prefix="compare-control")
            with gr.Row():
                run = gr.Button("Compare", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
        with gr.Column(scale=6):
            grids = gr.Gallery(label="Grid (one per Z value)", format="png", columns=1, height=520,
                               object_fit="contain", interactive=False, elem_id="compare-grid")
            # wrapped, in columns of set widths: long cell names (three axes) pushed the CLIP column out of sight
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Cells", interactive=False, wrap=True,
                                 column_widths=["55%", "15%", "30%"], elem_id="compare-table")
            cells = gr.Gallery(label="Cells (each a PNG with its parameters; click two to compare them)",
                               format="png", columns=4, height="fit-content", interactive=False,
                               elem_id="compare-cells")  # as tall as its rows up to 520 px (app.py's CSS)
            picked = gr.State([])
            pair = gr.ImageSlider(label="Two cells, side by side (drag the bar)", type="pil", format="png",
                                  max_height=420, interactive=False, elem_id="compare-slider")

    # The one map from the form's components to the request's fields (gradio's inputs_kwargs): the handlers and
    # the API's parameters take these names, in this order.
    form = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, x_type=axes[0], x_values=axes[1],
                y_type=axes[2], y_values=axes[3], z_type=axes[4], z_values=axes[5], **controls.fields)

    def request_of(fields: dict) -> CompareRequest:
        plain, units = form_control_units(fields, comparison.text_to_image.limits.max_upload_pixels)
        return form_request(**plain, controls=units)
    on_device = runner.device_function("compare", comparison)

    def check(request: gr.Request, **fields):
        """Instant feedback: the whole grid checked before the job waits in the GPU queue."""
        try:
            comparison.plan(request_of(fields))
        except StudioError as error:  # a wrong setting, or a preprocessor's weights that cannot be had
            raise user_error(error, "Check the grid") from None
        runner.submitted(request, TAB)

    def compare(request: gr.Request, progress=gr.Progress(), **fields):
        """One prompt over up to three axes (A1111's X/Y/Z syntax; an empty type or "Nothing" is no axis). Returns
        the labelled grids (one per Z value), every cell as a PNG with its parameters, and a table of the cells
        with their time and CLIP score. control_1_*: a ControlNet unit for every cell (the [ControlNet] axes vary
        it); its model must fit each cell's preset. Client.submit also sees the grid fill in as it runs (a
        "Forming…" grid, the running cell's live preview in its place)."""
        wanted = request_of(fields)
        # a generator: the grid filling in (the running cell forming in its place) as Client.submit's intermediate
        # outputs, then the result
        yield from runner.stream_job(TAB, request, progress, comparison, lambda: comparison.plan(wanted), on_device,
                                     "Cannot compare", gallery_preview, compared)

    def compared(plan, result):
        for warning in result.warnings:
            gr.Warning(warning)
        if result.interrupted:
            made = sum(1 for cell in result.cells if cell.image)
            gr.Info(f"Stopped: {made} of {plan.grid.cell_count} cells made; the grid shows them.")
        names = [cell_name(plan, cell.cell) for cell in result.cells]
        clip = f"CLIP score ({result.clip_label})" if result.clip_label else "CLIP score"
        # a cell Stop cut short (or the safety checker hid) is listed as such, not as if it were made
        rows = [[name if cell.image else f"{name} (not made)", round(cell.seconds, 2),
                 None if cell.clip_score is None else round(cell.clip_score, 2)]
                for name, cell in zip(names, result.cells)]
        gallery = [(cell.image.image, name) for name, cell in zip(names, result.cells) if cell.image]
        return result.grids(), {"headers": ["cell", "seconds", clip], "data": rows}, gallery

    optional_control_images(compare, controls.count)  # the API may leave a unit's image out

    def pick(chosen, gallery, selection: gr.SelectData):
        """The last two different cells clicked, on the slider (clicking the cell just clicked changes nothing)."""
        if chosen and chosen[-1] == selection.index:
            return chosen, gr.skip()
        chosen = (chosen + [selection.index])[-2:]
        if len(chosen) < 2 or not gallery:
            return chosen, gr.skip()
        (first, first_name), (second, second_name) = (gallery[index] for index in chosen)
        return chosen, gr.ImageSlider(value=(first, second), label=f"Left: {first_name} · right: {second_name}")

    gpu_event = dict(concurrency_id="gpu", concurrency_limit=runner.concurrency, show_progress_on=[grids])
    checked = run.click(check, None, None, inputs_kwargs=form, **QUICK)
    # the last grid's table, cells and pair go as the new grid starts forming: they are not its
    checked.success(lambda: (None, [], [], None), None, [table, cells, picked, pair], **INSTANT)
    event = checked.success(compare, None, [grids, table, cells], inputs_kwargs=form, api_name="compare", **gpu_event)
    event.failure(lambda: (None, None, []), None, [grids, table, cells], **INSTANT)  # no half-formed grid left
    event.then(lambda: ([], None), None, [picked, pair], **INSTANT)  # a new grid
    runner.wire_stop(stop, TAB)
    # one queued event for every axis field, its answer always for the last keystroke: unqueued, each keystroke's
    # answer could come after the next one's on a busy machine, leaving the note of a value no longer there
    gr.on([control.change for control in axes], lambda *values: cell_count_note(comparison, *values), axes, count,
          trigger_mode="always_last", **QUICK)
    cells.select(pick, [picked, cells], [picked, pair], **INSTANT)
    return CompareTab(event)


def cell_name(plan: ComparePlan, cell) -> str:
    grid = plan.grid
    parts = [axis.labels[index] for axis, index in zip(grid.axes, (cell.x, cell.y, cell.z)) if axis is not None]
    return ", ".join(parts) or "the prompt"

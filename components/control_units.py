"""ControlNet units, as A1111's ControlNet extension lays them out: one tab per unit, each with its control image,
preprocessor (its map shown as soon as there is an image), model, weight, guidance start and end, control mode,
resize mode and pixel perfect. A tab lists each unit's fields in its form as control_<n>_<field>, so the API takes
them by those names (an API caller's null is the field's default)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from components.editor_bridge import editor_images, pick_brush_js
from components.event_options import INSTANT, QUICK
from components.running import user_error
from components.whole_numbers import WholeSlider
from studio.core.errors import InvalidRequest, StudioError
from studio.core.images import open_image
from studio.models.controlnets import CONTROL_MODES, ControlNetCatalog
from studio.tasks.control import (
    CROP_AND_RESIZE,
    MAX_PROCESSOR_RES,
    MAX_WEIGHT,
    MIN_PROCESSOR_RES,
    RESIZE_MODES,
    ControlUnit,
    WeightsFor,
    preview_map,
)
from studio.tasks.preprocessors import PREPROCESSORS, Threshold
from studio.tasks.requests import whole

UNIT_FIELDS = ("enabled", "image", "preprocessor", "model", "weight", "guidance_start", "guidance_end",
               "control_mode", "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
PREFIX = "control_"
HELP = ("A ControlNet makes the image follow a map: the lines of a sketch, the edges of a photo. Give a control "
        "image, pick the preprocessor that turns it into the map the model reads (shown beside it), and the model. "
        "Weight scales its pull; guidance start and end are the fraction of the steps it acts on. As in "
        "AUTOMATIC1111's ControlNet extension.")


class ControlImage(gr.Image):
    """gr.Image handing the handler the uploaded file's path undecoded: the studio opens it (open_image) and says
    what is wrong with a file that is not an image, where gradio's own decoding answered "The upstream Gradio app
    has raised an exception"."""

    is_template = True  # drawn by gradio's Image in the browser

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return super().preprocess(payload)


def field_name(index: int, name: str) -> str:
    """The form's (and the API's) name of unit `index`'s field: control_1_weight for the first unit's weight."""
    return f"{PREFIX}{index + 1}_{name}"


def _or(value, default):
    return default if value is None else value


def optional_control_images(handler: Callable, count: int) -> Callable:
    """`handler` (taking the form as **fields) with its units' control images optional in the API, and their
    models (empty where the default preset's family has none). gradio makes an input whose component starts empty
    a required API parameter, unless the handler's own signature gives it a None default: so the signature says
    so (the function still takes them in **fields)."""
    signature = inspect.signature(handler)
    parameters = list(signature.parameters.values())
    images = [inspect.Parameter(field_name(index, name), inspect.Parameter.KEYWORD_ONLY, default=None)
              for index in range(count) for name in ("image", "model")]
    handler.__signature__ = signature.replace(parameters=parameters[:-1] + images + parameters[-1:])
    return handler


def split_control_fields(fields: dict) -> tuple[dict, list[dict]]:
    """A handler's keyword arguments as (the other fields, each unit's fields by their plain names)."""
    rest = {name: value for name, value in fields.items() if not name.startswith(PREFIX)}
    units, index = [], 0
    while field_name(index, "enabled") in fields:
        units.append({name: fields.get(field_name(index, name)) for name in UNIT_FIELDS})
        index += 1
    return rest, units


def unit_from_values(values: dict, image, label: str = "ControlNet unit") -> ControlUnit:
    """One unit from its fields (None: the default), with `image` already opened (None: the request's own)."""
    threshold_a, threshold_b = values.get("threshold_a"), values.get("threshold_b")
    try:
        return ControlUnit(
            model=values.get("model") or "", image=image, preprocessor=values.get("preprocessor") or "none",
            weight=float(_or(values.get("weight"), 1.0)),
            guidance_start=float(_or(values.get("guidance_start"), 0.0)),
            guidance_end=float(_or(values.get("guidance_end"), 1.0)),
            control_mode=values.get("control_mode") or CONTROL_MODES[0],
            resize_mode=values.get("resize_mode") or CROP_AND_RESIZE,
            pixel_perfect=bool(values.get("pixel_perfect")),
            processor_res=whole(float(_or(values.get("processor_res"), 512))),
            threshold_a=None if threshold_a is None else float(threshold_a),
            threshold_b=None if threshold_b is None else float(threshold_b), label=label)
    except (TypeError, ValueError) as error:
        raise InvalidRequest([f"{label}: a setting is not a number ({error})."]) from None


def form_control_units(fields: dict, max_upload_pixels: int) -> tuple[dict, tuple[ControlUnit, ...]]:
    """control_units for a tab's handler: a unit that cannot be used is the visitor's error, said in the page."""
    try:
        return control_units(fields, max_upload_pixels)
    except StudioError as error:
        raise user_error(error, "Check the ControlNet units") from None


def control_units(fields: dict, max_upload_pixels: int) -> tuple[dict, tuple[ControlUnit, ...]]:
    """(the other fields, the enabled units) from a handler's keyword arguments; each unit's image is opened with
    a message that names it (not an image, or over the upload limit). Raises InvalidRequest."""
    rest, units = split_control_fields(fields)
    chosen = []
    for index, values in enumerate(units):
        if not values["enabled"]:
            continue
        label = f"ControlNet unit {index + 1}"
        image = open_image(values["image"], f"{label}'s control image", max_upload_pixels) \
            if values["image"] is not None else None
        chosen.append(unit_from_values(values, image, label))
    return rest, tuple(chosen)


# a drawn control image's size: SD 1.5's, and what a hand draws in a form; its map is fitted to the image's size
# (an SDXL image reads it scaled up, which a line drawing takes well)
DRAWING_CANVAS = (512, 512)
MAP_INPUTS = ("image", "preprocessor", "processor_res", "threshold_a", "threshold_b")
PREPROCESSOR_INFO = ("none: the image as the map · invert: dark lines on white become white on black · scribble: "
                     "thick lines of a drawing or photo · canny: edges · lineart, softedge, depth: learned detectors "
                     "for photos (their weights are fetched once)")


def map_of(image, own_image, preprocessor, processor_res, threshold_a, threshold_b, max_upload_pixels: int,
           weights_for: WeightsFor):
    """The preprocessed map a unit shows: of its uploaded image (a path), else of `own_image` (the tab's picture,
    opened); None when there is neither."""
    try:
        opened = open_image(image, "control image", max_upload_pixels) if image is not None else own_image
        if opened is None:
            return None
        values = dict(preprocessor=preprocessor, processor_res=processor_res, threshold_a=threshold_a,
                      threshold_b=threshold_b)
        return preview_map(unit_from_values(values, opened), opened, max_upload_pixels, weights_for)
    except StudioError as error:
        raise user_error(error, "Cannot preprocess this image") from None


def threshold_sliders(preprocessor: str) -> list[gr.Slider]:
    """Updates for a unit's two threshold sliders, fitted to the preprocessor named."""
    chosen = PREPROCESSORS.get(preprocessor)
    return [threshold_slider(chosen and chosen.threshold_a), threshold_slider(chosen and chosen.threshold_b)]


def trained_settings(catalog: ControlNetCatalog, model: str) -> list:
    """Updates for a unit's preprocessor and thresholds: the ones `model` was trained on."""
    name = catalog.get(model).preprocessor
    return [name, *threshold_sliders(name)]


def threshold_slider(threshold: Threshold | None, value=None) -> gr.Slider:
    """A preprocessor's threshold; hidden, at -1 (A1111's "not used"), for one that takes none."""
    if threshold is None:
        return gr.Slider(minimum=-1, value=-1, visible=False)
    return gr.Slider(minimum=threshold.minimum, maximum=threshold.maximum, value=_or(value, threshold.default),
                     label=threshold.label, visible=True)


def model_choices(catalog: ControlNetCatalog, names: list[str]) -> list[tuple[str, str]]:
    return [(catalog.get(name).label, name) for name in names]


def models_note(names: list[str], catalog: ControlNetCatalog) -> str:
    if names:
        return ""
    return f"None of the {len(catalog.names)} ControlNets here is made for this preset's family."


@dataclass
class ControlUnitsForm:
    """The units' components; `fields` maps each API name to its component, in the API's order."""

    fields: dict[str, gr.Component]
    accordion: gr.Accordion
    count: int
    catalog: ControlNetCatalog
    weights_for: WeightsFor  # a learned preprocessor's files, for the maps
    models: list[gr.Dropdown] = field(default_factory=list)
    images: list[gr.Image] = field(default_factory=list)
    enabled: list[gr.Checkbox] = field(default_factory=list)
    maps: list[gr.Image] = field(default_factory=list)  # each unit's preprocessed map, shown before anything runs
    # with `own_image`: each unit's button that shows the map of the tab's own picture (the tab wires it)
    own_map_buttons: list[gr.Button] = field(default_factory=list)
    map_events: list[dict] = field(default_factory=list)  # each unit's event options that remake its map

    def refresh_maps(self, event) -> None:
        """After `event` changed the units' settings (a form filled from a PNG), their maps are made again."""
        for options in self.map_events:
            event.then(**options)

    def component(self, index: int, name: str) -> gr.Component:
        return self.fields[field_name(index, name)]

    def map_settings(self, index: int) -> list[gr.Component]:
        """Unit `index`'s uploaded image and preprocessor settings: the inputs of `map_of`."""
        return [self.component(index, name) for name in MAP_INPUTS]

    def follow(self, preset: gr.Dropdown, family_of_preset: Callable[[str], str]) -> None:
        """Offer the ControlNets made for the family of the preset chosen in `preset`; a unit whose model is not
        among them gets the first, with the preprocessor it was trained on (and its map remade)."""
        settings = [self.component(index, name) for index in range(self.count)
                    for name in ("preprocessor", "threshold_a", "threshold_b")]

        def offered(preset_name, *current):
            names = self.catalog.for_family(family_of_preset(preset_name))
            models, fitted = [], []
            for value in current:
                chosen = value if value in names else (names[0] if names else None)
                models.append(gr.Dropdown(choices=model_choices(self.catalog, names), value=chosen,
                                          info=models_note(names, self.catalog)))
                fitted += (trained_settings(self.catalog, chosen) if chosen != value and chosen is not None
                           else [gr.skip()] * 3)
            return models + fitted

        changed = preset.change(offered, [preset, *self.models], self.models + settings, **INSTANT)
        self.refresh_maps(changed)

    def clear_own_maps(self, trigger) -> None:
        """On `trigger` (the tab's picture changed), the maps made of the picture are cleared in the page (no
        server call): a unit with an upload of its own keeps its map."""
        count = self.count
        trigger(None, self.images + self.maps, self.maps, js=f"(...values) => values.slice({count}).map("
                f"(map, index) => values[index] ? map : null)", **INSTANT)

    def values_for(self, units: tuple[ControlUnit, ...]) -> list:
        """Updates for every unit field, in `fields`' order, showing `units` (a form filled from a PNG): the
        control images stay as they are (a PNG holds none), units beyond them are turned off."""
        if len(units) > self.count:
            gr.Warning(f"The PNG has {len(units)} ControlNet units; this form has {self.count}: the first "
                       f"{self.count} are set.")
        updates = []
        for index in range(self.count):
            unit = units[index] if index < len(units) else None
            if unit is None:
                updates += [False] + [gr.skip()] * (len(UNIT_FIELDS) - 1)
                continue
            preprocessor = PREPROCESSORS.get(unit.preprocessor)
            updates += [True, gr.skip(), unit.preprocessor, unit.model, unit.weight, unit.guidance_start,
                        unit.guidance_end, unit.control_mode, unit.resize_mode, unit.pixel_perfect,
                        unit.processor_res, threshold_slider(preprocessor and preprocessor.threshold_a, unit.threshold_a),
                        threshold_slider(preprocessor and preprocessor.threshold_b, unit.threshold_b)]
        return updates


def build_control_units(catalog: ControlNetCatalog, count: int, offered: list[str], max_upload_pixels: int,
                        weights_for: WeightsFor,
                        own_image: str | None = None, elem_prefix: str = "control") -> ControlUnitsForm:
    """An accordion of `count` units offering the ControlNets `offered` (those of the default preset's family).
    `own_image`: what a unit without an image of its own reads (Inpaint: "the picture"), None where it needs one.
    Call `.follow(preset, ...)` once the preset dropdown exists."""
    fields: dict[str, gr.Component] = {}
    models, maps, own_map_buttons, map_events, images, enabled = [], [], [], [], [], []
    with gr.Accordion("ControlNet", open=False, elem_id=f"{elem_prefix}-units") as accordion:
        gr.Markdown(HELP + (f" A unit without a control image of its own reads {own_image}." if own_image else ""),
                    elem_classes="control-help")
        with gr.Tabs():
            for index in range(count):
                with gr.Tab(f"Unit {index + 1}"):
                    unit = _build_unit(index, catalog, offered, elem_prefix, own_image)
                    if own_image:
                        own_map_buttons.append(unit["own_map"])
                    fields.update({field_name(index, name): component for name, component in unit.items()
                                   if name in UNIT_FIELDS})
                    models.append(unit["model"])
                    images.append(unit["image"])
                    enabled.append(unit["enabled"])
                    maps.append(unit["map"])
                    map_events.append(_wire_unit(unit, catalog, max_upload_pixels, weights_for))
    return ControlUnitsForm(fields=fields, accordion=accordion, count=count, catalog=catalog, weights_for=weights_for,
                            models=models,
                            maps=maps, own_map_buttons=own_map_buttons, map_events=map_events, images=images,
                            enabled=enabled)


def _build_unit(index: int, catalog: ControlNetCatalog, offered: list[str], elem_prefix: str,
                own_image: str | None) -> dict[str, gr.Component]:
    first = catalog.get(offered[0]) if offered else None
    preprocessor = PREPROCESSORS[first.preprocessor if first else "none"]
    unit: dict[str, gr.Component] = {}
    element = f"{elem_prefix}-unit-{index + 1}"
    unit["enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"{element}-enabled")
    with gr.Row(equal_height=True):
        with gr.Column(scale=1, min_width=200):  # the two images side by side, as wide as each other
            unit["image"] = ControlImage(label="Control image", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard"], height=220, elem_id=f"{element}-image")
        with gr.Column(scale=1, min_width=200):
            unit["map"] = gr.Image(label="Map it reads", interactive=False,
                                   height=220, format="png", buttons=["download"], elem_id=f"{element}-map")
            if own_image:
                unit["own_map"] = gr.Button(f"Show the map of {own_image}", size="sm", elem_id=f"{element}-own-map")
    if not own_image:  # a tab without a picture of its own: the control image may be drawn here
        with gr.Accordion("Draw the control image", open=False, elem_id=f"{element}-draw") as unit["draw"]:
            # as wide as it is high, so that the paper fills it: a stroke begun beside the paper draws nothing
            unit["canvas"] = gr.Sketchpad(
                label="Drawing", type="pil", image_mode="RGBA", format="png", sources=(),
                layers=False, transforms=(), canvas_size=DRAWING_CANVAS, height=420, width=420,
                elem_id=f"{element}-canvas",
                brush=gr.Brush(colors=["#000000"], default_color="#000000", default_size=6, color_mode="fixed"))
            unit["use_drawing"] = gr.Button("Use the drawing as the control image", size="sm",
                                            elem_id=f"{element}-use-drawing")
            unit["drawing_sent"] = gr.JSON(visible="hidden")  # the canvas's files, as the page sent them
    with gr.Row():
        # the names alone (a description cut off mid-word by the arrow read badly); what each does is the info line
        unit["preprocessor"] = gr.Dropdown(
            list(PREPROCESSORS), value=preprocessor.name, label="Preprocessor", allow_custom_value=True,
            info=PREPROCESSOR_INFO, elem_id=f"{element}-preprocessor")
        unit["model"] = gr.Dropdown(model_choices(catalog, offered), value=first.name if first else None,
                                    label="Model", allow_custom_value=True, info=models_note(offered, catalog),
                                    elem_id=f"{element}-model")
    with gr.Row():
        unit["weight"] = gr.Slider(0, MAX_WEIGHT, value=1.0, step=0.05, label="Control weight")
        unit["guidance_start"] = gr.Slider(0, 1, value=0.0, step=0.01, label="Starting control step")
        unit["guidance_end"] = gr.Slider(0, 1, value=1.0, step=0.01, label="Ending control step")
    unit["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode")
    unit["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=CROP_AND_RESIZE, label="Resize mode",
                                   info="How the map is fitted to the image's size")
    with gr.Row():
        unit["pixel_perfect"] = gr.Checkbox(False, label="Pixel perfect",
                                            info="Preprocess at the resolution the image is generated at")
        unit["processor_res"] = WholeSlider(MIN_PROCESSOR_RES, MAX_PROCESSOR_RES, value=512, step=8,
                                            label="Preprocessor resolution")
    with gr.Row():
        for name, threshold in (("threshold_a", preprocessor.threshold_a), ("threshold_b", preprocessor.threshold_b)):
            # -1: the preprocessor's default (an API caller who leaves it out gets that)
            unit[name] = gr.Slider(-1, 255, value=threshold.default if threshold else -1, step=1,
                                   label=threshold.label if threshold else "Threshold", visible=threshold is not None)
    return unit


def _wire_unit(unit: dict[str, gr.Component], catalog: ControlNetCatalog, max_upload_pixels: int,
               weights_for: WeightsFor) -> dict:
    """The map follows the image and the preprocessor's settings; a model picks the preprocessor it was trained on;
    an uploaded image turns the unit on, as in A1111."""

    def show_map(image, *settings):
        return map_of(image, None, *settings, max_upload_pixels, weights_for) if image is not None else None

    # The map follows the settings. After a change of preprocessor it is made once its thresholds are fitted
    # (`then`): made at the same time, it read the old threshold against the new one's range, refused by gradio.
    refresh_map = dict(fn=show_map, inputs=[unit[name] for name in MAP_INPUTS], outputs=unit["map"],
                       **QUICK)  # queued: a refusal shows as a toast
    for trigger in (unit["image"].change, unit["processor_res"].release, unit["threshold_a"].release,
                    unit["threshold_b"].release):
        trigger(**refresh_map)

    unit["preprocessor"].input(threshold_sliders, unit["preprocessor"], [unit["threshold_a"], unit["threshold_b"]],
                               **INSTANT).then(**refresh_map)

    def trained_preprocessor(model):
        if model not in catalog:
            return gr.skip(), gr.skip(), gr.skip()
        return tuple(trained_settings(catalog, model))

    unit["model"].input(trained_preprocessor, unit["model"],
                        [unit["preprocessor"], unit["threshold_a"], unit["threshold_b"]], **INSTANT).then(**refresh_map)
    unit["image"].upload(lambda: True, None, unit["enabled"], **INSTANT)
    if "canvas" in unit:
        _wire_drawing(unit, max_upload_pixels)
    unit["pixel_perfect"].change(lambda on: gr.Slider(interactive=not on), unit["pixel_perfect"],
                                 unit["processor_res"], **INSTANT)
    return refresh_map


def _wire_drawing(unit: dict[str, gr.Component], max_upload_pixels: int) -> None:
    """The drawing canvas: its Brush picked when it opens; "Use the drawing" makes it the control image (which
    turns the unit on and shows the map). The canvas is read the way the Inpaint editor is (editor_bridge): the
    page copies its value into a hidden field, so no server event re-reads it at every progress tick."""
    canvas = unit["canvas"]

    def use_drawing(sent):
        """The drawing as the control image, the unit on, and the canvas folded away, so that the image and its
        map (above it) come into view."""
        drawing = editor_images(canvas, sent, max_upload_pixels).get("composite")
        return drawing_on_paper(drawing), True, gr.Accordion(open=False)

    unit["draw"].expand(None, None, None, js=pick_brush_js(canvas.elem_id), **INSTANT)
    copied = unit["use_drawing"].click(None, canvas, unit["drawing_sent"], js="(value) => value", **INSTANT)
    used = copied.success(use_drawing, unit["drawing_sent"], [unit["image"], unit["enabled"], unit["draw"]], **QUICK)
    used.success(None, js=f"() => document.getElementById({unit['map'].elem_id!r})"
                          "?.scrollIntoView({block: 'nearest', behavior: 'smooth'})", **INSTANT)


def drawing_on_paper(drawing: Image.Image | None) -> Image.Image:
    """A canvas's strokes (RGBA, clear where nothing is drawn) on white paper, as a drawing is scanned: the invert
    and scribble preprocessors read dark lines on white."""
    drawing = drawing.convert("RGBA") if drawing is not None else None
    if drawing is None or not drawing.getchannel("A").getbbox():
        raise user_error(InvalidRequest(["Nothing is drawn on the white paper: draw on it with the brush first (a "
                                         "stroke begun beside the paper draws nothing)."]), "Nothing drawn")
    paper = Image.new("RGB", drawing.size, "white")
    paper.paste(drawing.convert("RGB"), mask=drawing.getchannel("A"))
    return paper

"""Inpaint's Outpaint and Soft inpainting settings (studio.tasks.outpainting, studio.tasks.soft_inpainting): two
accordions in the form, their values by the request's field names."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from components.whole_numbers import WholeNumber
from studio.core.errors import InvalidRequest
from studio.tasks.outpainting import BLUR, FILLS, SIDES, Outpaint, placed
from studio.tasks.requests import whole
from studio.tasks.soft_inpainting import LABELS, RANGES, SoftInpainting

FILL_INFO = ("What the new area starts as; it shows through only below denoising strength 1 (0.8 or so carries the "
             "image's colours outwards). Blur: A1111's fill; Edge: the nearest edge pixel, as Fooocus; Matched "
             "noise: mk2's, grain like the image's")
SOFT_INFO = {
    "schedule_bias": "Above 1 keeps the original early in the steps, below 1 late",
    "preservation_strength": "How strongly partly masked content is kept",
    "transition_contrast_boost": "Keeps a half-kept area from fading",
    "mask_influence": "How much the mask, besides the change, decides what is pasted back",
    "difference_threshold": "How much an area may change and still get the original back",
    "difference_contrast": "How sharp the change from original to new is",
}
STEPS = {"schedule_bias": 0.1, "preservation_strength": 0.05, "transition_contrast_boost": 0.5,
         "mask_influence": 0.05, "difference_threshold": 0.25, "difference_contrast": 0.25}


@dataclass
class CanvasSettings:
    sides: dict[str, gr.Number]
    placement: list[gr.Number]  # canvas width and height, the image's x and y on it
    place: gr.Button
    fill: gr.Dropdown
    falloff: gr.Slider
    colour_variation: gr.Slider
    soft: gr.Checkbox
    soft_settings: dict[str, gr.Slider]

    @property
    def fields(self) -> dict:
        """The form's components by the handlers' parameter names (the API's too)."""
        return {**{f"outpaint_{side}": number for side, number in self.sides.items()},
                "outpaint_fill": self.fill, "outpaint_falloff": self.falloff,
                "outpaint_colour_variation": self.colour_variation, "soft_inpainting": self.soft,
                **{f"soft_{name}": slider for name, slider in self.soft_settings.items()}}


def build_canvas_settings() -> CanvasSettings:
    with gr.Accordion("Outpaint: extend the canvas", open=False, elem_id="inpaint-outpaint"):
        gr.Markdown("Grow the image by this many pixels on each side and fill the new area (no mask needed; strokes "
                    "on the image are repainted too).")
        with gr.Row():
            # no minimum or maximum: gradio's own refusal would not name the field; the request's check does
            sides = {side: WholeNumber(0, label=f"{side.capitalize()}, pixels", step=8, min_width=90,
                                       elem_id=f"outpaint-{side}")
                     for side in SIDES}
        with gr.Row():
            fill = gr.Dropdown(list(FILLS), value=BLUR, label="Fill the new area with", info=FILL_INFO)
            falloff = gr.Slider(0.25, 4, value=Outpaint.falloff, step=0.05, label="Fall-off exponent",
                                info="Matched noise: lower keeps it further out")
            colour_variation = gr.Slider(0, 1, value=Outpaint.colour_variation, step=0.01, label="Colour variation",
                                         info="Matched noise: 0 varies lightness only")
        with gr.Row(equal_height=True):  # a mockup: the image placed on a canvas of a given size
            placement = [WholeNumber(None, label=label, min_width=90, elem_id=f"outpaint-{name}")
                         for name, label in (("canvas-width", "Canvas width"), ("canvas-height", "Canvas height"),
                                             ("x", "Image at x"), ("y", "Image at y"))]
            place = gr.Button("Place the image on this canvas", size="sm", min_width=120, elem_id="outpaint-place")
    with gr.Accordion("Soft inpainting", open=False, elem_id="inpaint-soft"):
        soft = gr.Checkbox(False, label="Soft inpainting", elem_id="soft-inpainting",
                           info="The blurred mask says per pixel how much may change, so edits blend without a seam "
                                "(A1111's; use a high mask blur)")
        defaults = SoftInpainting()
        soft_settings = {name: gr.Slider(*RANGES[name], value=getattr(defaults, name), step=STEPS[name],
                                         label=LABELS[name], info=SOFT_INFO[name]) for name in LABELS}
    return CanvasSettings(sides, placement, place, fill, falloff, colour_variation, soft, soft_settings)


def placed_sides(image_size, canvas_width, canvas_height, x, y) -> list[int]:
    """The four sides (the form's order) that put the editor's image (`image_size`, None when there is none) at
    (x, y) on a canvas of the given size: a mockup's placement. Raises InvalidRequest, said as a toast."""
    if not image_size:
        raise InvalidRequest(["Load an image into the editor first: the canvas is placed around it."])
    if any(value is None for value in (canvas_width, canvas_height)):
        raise InvalidRequest(["Give the canvas's width and height (and where the image goes on it: x and y)."])
    try:
        outpaint = placed(tuple(image_size), (whole(canvas_width), whole(canvas_height)),
                          (whole(x) if x is not None else 0, whole(y) if y is not None else 0))
    except ValueError as error:
        raise InvalidRequest([str(error)]) from None
    return list(outpaint.sides.values())


def canvas_fields(outpaint_left=0, outpaint_right=0, outpaint_top=0, outpaint_bottom=0, outpaint_fill=BLUR,
                  outpaint_falloff=Outpaint.falloff, outpaint_colour_variation=Outpaint.colour_variation,
                  soft_inpainting=False, **soft) -> dict:
    """The request's `outpaint` and `soft` from the form's (or an API caller's) values: no outpaint where no side
    grows, no soft inpainting unless it is ticked; an empty value is the default."""
    sides = {side: whole(value) if value is not None else 0 for side, value in
             zip(SIDES, (outpaint_left, outpaint_right, outpaint_top, outpaint_bottom))}
    outpaint = None
    if any(sides.values()):
        outpaint = Outpaint(**sides, fill=outpaint_fill or BLUR,
                            falloff=Outpaint.falloff if outpaint_falloff is None else float(outpaint_falloff),
                            colour_variation=(Outpaint.colour_variation if outpaint_colour_variation is None
                                              else float(outpaint_colour_variation)))
    settings = None
    if soft_inpainting:  # a setting left empty is A1111's default
        settings = SoftInpainting(**{name: float(soft[f"soft_{name}"]) for name in LABELS
                                     if soft.get(f"soft_{name}") is not None})
    return dict(outpaint=outpaint, soft=settings)


def canvas_values(outpaint: Outpaint | None, soft: SoftInpainting | None) -> list:
    """The form's values for a request's outpaint and soft inpainting (a PNG's), in `fields`' order."""
    outpaint = outpaint or Outpaint()
    shown = soft or SoftInpainting()
    return [*outpaint.sides.values(), outpaint.fill, outpaint.falloff, outpaint.colour_variation,
            soft is not None, *(getattr(shown, name) for name in LABELS)]

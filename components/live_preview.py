"""The live preview settings every generating tab's form has (Text to image, Inpaint)."""

from __future__ import annotations

import gradio as gr

from components.whole_numbers import WholeSlider
from studio.tasks.previews import DEFAULT_PREVIEW_EVERY, LIVE_PREVIEWS, TAESD
from studio.tasks.requests import whole

INFO = ("The image as it forms. TAESD: sharp, at the image's size; Fast: rough, smaller (TAESD is Fast for models "
        "without one)")


def build_live_preview_settings(max_steps: int, elem_id: str) -> tuple[gr.Radio, WholeSlider]:
    """(Live preview, Preview every N steps), side by side."""
    with gr.Row():
        live_preview = gr.Radio(list(LIVE_PREVIEWS), value=TAESD, label="Live preview", elem_id=elem_id, info=INFO)
        preview_every = WholeSlider(0, max_steps, value=DEFAULT_PREVIEW_EVERY, step=1, label="Preview every N steps",
                                    info="0: Auto, as often as they take at most 3% of the time")
    return live_preview, preview_every


def live_preview_fields(live_preview, preview_every) -> dict:
    """The request's fields from the form's (or an API caller's) values; a null is the default."""
    return dict(live_preview=live_preview or TAESD,
                preview_every=whole(preview_every) if preview_every is not None else DEFAULT_PREVIEW_EVERY)

"""A tab's history of this session's images: small thumbnails under the results, newest first; clicking one
loads the settings its PNG was made with back into the form (as Fooocus' and InvokeAI's galleries do).

The history lives in a gr.State, so it belongs to the page: another browser tab or visitor has its own. It keeps
each image's parameters text itself, so a click still works after gradio's cache has cleaned the file away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from components.event_options import INSTANT
from studio.a1111.metadata import parse_parameters, read_parameters

HISTORY_SIZE = 48  # images kept per page


@dataclass
class History:
    state: gr.State  # [(png path, caption, parameters text)], newest first
    gallery: gr.Gallery

    def follow(self, events: list, results: gr.Gallery) -> None:
        """After each successful generation, put its images in front of the history."""
        for event in events:
            event.success(add_to_history, [results, self.state], [self.state, self.gallery],
                          **INSTANT)

    def on_click(self, fill_form: Callable, form: dict[str, gr.components.Component], outputs: list,
                 **event_options):
        """Clicking a thumbnail calls `fill_form(parameters_text, **form's values)` and shows its result in
        `outputs`."""

        def load(selection: gr.SelectData, past, **fields):
            _path, _caption, parameters = past[selection.index]
            return fill_form(parameters, **fields)

        return self.gallery.select(load, self.state, outputs, inputs_kwargs=form, **event_options)


def build_history(elem_id: str) -> History:
    with gr.Accordion("History of this session: click an image to load its settings", open=True):
        state = gr.State([])
        # as tall as its rows (up to three, then it scrolls: app.py's CSS), never a row cut in half
        gallery = gr.Gallery(label="History", show_label=False, format="png", columns=6, height="fit-content",
                             object_fit="contain", interactive=False, allow_preview=False, elem_id=elem_id,
                             elem_classes="history-gallery")
    return History(state, gallery)


def add_to_history(results, past):
    """This batch's images (PNGs with their parameters) in front of the session's earlier ones; returns the new
    history and its thumbnails. A thumbnail has a caption only where Stop cut its image short: the history is a
    strip of plain images, and an unfinished one must not pass for a finished one."""
    fresh = []
    for path, _caption in results or []:
        parameters = read_parameters(path) or ""
        fresh.append((path, unfinished_note(parameters), parameters))
    kept = (fresh + list(past or []))[:HISTORY_SIZE]
    return kept, [(path, caption) for path, caption, _ in kept]


def unfinished_note(parameters: str) -> str | None:
    """"Unfinished (stopped at step 51)" for an image whose parameters say Stop cut it short, else None."""
    fields = parse_parameters(parameters).extra if parameters else {}
    for name, where in (("Stopped at step", "step"), ("Stopped at hires step", "hires step")):
        if name in fields:
            return f"Unfinished (stopped at {where} {fields[name]})"
    return None

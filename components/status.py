"""The memory status line under the tabs: which models are loaded, where, and how many bytes."""

from __future__ import annotations

import gradio as gr

from components.event_options import INSTANT
from studio.core.memory import ModelManager


def build_status_bar(demo: gr.Blocks, manager: ModelManager, refresh_after: list) -> gr.Markdown:
    def current_status() -> str:
        return f"<small>Memory · {manager.status().summary()}</small>"

    with gr.Row():
        status = gr.Markdown(current_status(), elem_id="memory-status")
        refresh = gr.Button("↻", size="sm", min_width=40, scale=0)
    # refreshed on page load by a private event (a callable value would add a public API endpoint of its own)
    demo.load(current_status, None, status, **INSTANT)
    refresh.click(current_status, None, status, **INSTANT)
    for event in refresh_after:
        event.then(current_status, None, status, **INSTANT)
    return status

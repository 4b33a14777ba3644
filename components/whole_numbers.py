"""Sliders and number fields for whole-number settings (steps, sizes, batch size, seed ...).

The API schema says "integer" for them, so a client that reads `view_api` sends integers. gradio's own way to get
that, `precision=0`, rounds whatever arrives (steps 20.5 would run 20 steps), so these keep gradio's default of no
rounding: a fraction reaches the handler as sent, and the studio's checks refuse it with a message
(`studio.tasks.sampling.whole`). In the browser they are gradio's own slider and number field.
"""

from __future__ import annotations

from typing import Any

import gradio as gr


class WholeSlider(gr.Slider):
    """gr.Slider whose API type is "integer"."""

    is_template = True  # drawn by gradio's Slider in the browser

    def api_info(self) -> dict[str, Any]:
        return {**super().api_info(), "type": "integer"}


class WholeNumber(gr.Number):
    """gr.Number whose API type is "integer" (and that does not round: see the module's docstring)."""

    is_template = True  # drawn by gradio's Number in the browser

    def api_info(self) -> dict[str, Any]:
        return {**super().api_info(), "type": "integer"}

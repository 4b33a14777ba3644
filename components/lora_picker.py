"""The LoRA picker: adds `<lora:name:weight>` to a prompt, as clicking a card in A1111's extra networks does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from components.event_options import INSTANT, NO_PROGRESS
from studio.a1111.prompts import LoraUse, with_lora
from studio.models.loras import LoraCatalog

HELP = ("Adds `<lora:name:weight>` to the prompt, as AUTOMATIC1111 does; choose again to change a LoRA's weight, "
        "or delete its tag to take it out. Several LoRAs apply at once. Weight 1 is the LoRA as trained; "
        "`<lora:name:te:unet>` sets the text encoder's and the UNet's weights apart. A LoRA only fits models of the "
        "family it was trained for: the list shows those that fit the chosen preset.")


def lora_choices(catalog: LoraCatalog, names: list[str]) -> list[tuple[str, str]]:
    return [(f"{name} — {catalog.get(name).description}" if catalog.get(name).description else name, name)
            for name in names]


def fitting_info(names: list[str], catalog: LoraCatalog) -> str:
    others = len(catalog.names) - len(names)
    if not names:
        return f"None of the {len(catalog.names)} LoRAs here fits this preset's family."
    return f"{others} more for other model families." if others else ""


@dataclass
class LoraPicker:
    name: gr.Dropdown | None  # None when there is no LoRA to pick
    catalog: LoraCatalog

    def follow(self, preset: gr.Dropdown, loras_that_fit: Callable[[str], list[str]]) -> None:
        """Offer the LoRAs that fit the preset chosen in `preset` (engine.loras_that_fit)."""
        if self.name is None:
            return

        def offered(preset_name: str) -> gr.Dropdown:
            names = loras_that_fit(preset_name)
            return gr.Dropdown(choices=lora_choices(self.catalog, names), value=names[0] if names else None,
                               info=fitting_info(names, self.catalog))

        preset.change(offered, preset, self.name, **INSTANT)


def build_lora_picker(catalog: LoraCatalog, prompt: gr.Textbox, offered: list[str]) -> LoraPicker:
    """An accordion under the prompt: a LoRA (of those `offered`: the ones that fit the default preset), its weight,
    and a button that writes the tag into `prompt`. Call `.follow(preset, ...)` once the preset dropdown exists."""
    with gr.Accordion(f"LoRA add-ons ({len(catalog.names)})", open=False):
        if not catalog.names:
            gr.Markdown("No LoRAs here yet: put `.safetensors` LoRA files (kohya/A1111 or diffusers) in `loras/` "
                        "and restart.")
            return LoraPicker(None, catalog)
        # the LoRA on a row of its own: its description must be readable, not cut to the column's width
        name = gr.Dropdown(lora_choices(catalog, offered), value=offered[0] if offered else None, label="LoRA",
                           info=fitting_info(offered, catalog))
        with gr.Row(equal_height=True):
            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=3)
            add = gr.Button("Add to prompt", scale=1, min_width=120)
        gr.Markdown(HELP, elem_classes="lora-help")

    def add_tag(text: str, chosen: str | None, value: float) -> str:
        if not chosen:
            raise gr.Error("Choose a LoRA first; none here fits this preset's family.", title="No LoRA chosen")
        if chosen not in catalog:
            raise gr.Error(catalog.unknown(chosen), title="Unknown LoRA")
        return with_lora(text or "", LoraUse(chosen, float(value), float(value)))

    # queued: gradio shows a gr.Error toast only for queued events
    add.click(add_tag, [prompt, name, weight], prompt, api_visibility="private", **NO_PROGRESS)
    return LoraPicker(name, catalog)

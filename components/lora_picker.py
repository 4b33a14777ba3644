"""The LoRA picker: adds `<lora:name:weight>` to a prompt, as clicking a card in A1111's extra networks does."""

from __future__ import annotations

import gradio as gr

from studio.loras import LoraCatalog
from studio.prompts import LoraUse, with_lora

HELP = ("Adds `<lora:name:weight>` to the prompt, as AUTOMATIC1111 does; choose again to change a LoRA's weight, "
        "or delete its tag to take it out. Several LoRAs apply at once. Weight 1 is the LoRA as trained; "
        "`<lora:name:te:unet>` sets the text encoder's and the UNet's weights apart. A LoRA only fits models of the "
        "family it was trained for.")


def lora_choices(catalog: LoraCatalog) -> list[tuple[str, str]]:
    return [(f"{name} — {preset.description}" if preset.description else name, name)
            for name, preset in catalog.presets.items()]


def build_lora_picker(catalog: LoraCatalog, prompt: gr.Textbox) -> None:
    """An accordion under the prompt: a LoRA, its weight, and a button that writes the tag into `prompt`."""
    with gr.Accordion(f"LoRA add-ons ({len(catalog.names)})", open=False):
        if not catalog.names:
            gr.Markdown("No LoRAs here yet: put `.safetensors` LoRA files (kohya/A1111 or diffusers) in `loras/` "
                        "and restart.")
            return
        with gr.Row(equal_height=True):
            name = gr.Dropdown(lora_choices(catalog), value=catalog.names[0], label="LoRA", scale=3)
            weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2)
            add = gr.Button("Add to prompt", scale=1, min_width=120)
        gr.Markdown(HELP, elem_classes="lora-help")

    def add_tag(text: str, chosen: str, value: float) -> str:
        if chosen not in catalog:
            raise gr.Error(catalog.unknown(chosen), title="Unknown LoRA")
        return with_lora(text or "", LoraUse(chosen, float(value), float(value)))

    add.click(add_tag, [prompt, name, weight], prompt, api_visibility="private")

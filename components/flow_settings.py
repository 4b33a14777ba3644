"""The settings of flow-matching models (SD 3.5, FLUX.1) in the generating tabs' forms: FLUX.1-dev's Distilled CFG
Scale (Forge's name) and the noise schedule's Shift, shown for the presets that take them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import gradio as gr

from studio.models.families import family_of

DISTILLED_INFO = ("FLUX.1-dev's guidance, learned by the model; empty: its own. CFG stays 1: above 1 it runs true "
                  "CFG with the negative prompt, at twice the time")
SHIFT_INFO = ("The noise schedule's shift: higher spends more of the steps on composition. Empty: the model's own "
              "(SD 3.5: 3; FLUX.1-dev: by the image's size; schnell: none)")


@dataclass
class FlowSettings:
    distilled_guidance: gr.Number
    shift: gr.Number

    @property
    def outputs(self) -> list:
        return [self.distilled_guidance, self.shift]


def build_flow_settings(preset, inpaint: bool = False) -> FlowSettings:
    """Both start empty (the API's default too): the model's own, which differs between a preset's models
    (FLUX.1-dev 3.5, its Fill model 30)."""
    with gr.Row():
        # no minimum or maximum here: gradio's own refusal would not name the field; the request's check does
        distilled_guidance = gr.Number(None, step=0.1,
                                       label="Distilled CFG Scale", info=DISTILLED_INFO,
                                       placeholder=own_distilled_guidance(preset, inpaint),
                                       visible=default_distilled_guidance(preset, inpaint) is not None)
        shift = gr.Number(None, step=0.1, label="Shift", info=SHIFT_INFO,
                          placeholder="the model's own", visible=family_of(preset).flow_matching)
    return FlowSettings(distilled_guidance, shift)


def default_distilled_guidance(preset, inpaint: bool = False) -> float | None:
    return preset.inpaint_default_distilled_guidance if inpaint else preset.distilled_guidance


def own_distilled_guidance(preset, inpaint: bool = False) -> str:
    default = default_distilled_guidance(preset, inpaint)
    return f"{default:g}, the model's own" if default is not None else ""


def flow_updates(preset, inpaint: bool = False, distilled_guidance=None, shift=None) -> tuple:
    """The two settings fitted to `preset` (shown where it takes them, empty unless a value is given: a PNG's)."""
    return (gr.Number(visible=default_distilled_guidance(preset, inpaint) is not None, value=distilled_guidance,
                      placeholder=own_distilled_guidance(preset, inpaint)),
            gr.Number(visible=family_of(preset).flow_matching, value=shift))


def flow_fields(distilled_guidance=None, shift=None) -> dict:
    """The request's fields from the form's (or an API caller's) values; empty (None) is the model's own.
    Families that take none ignore them."""
    return dict(distilled_guidance=None if distilled_guidance is None else float(distilled_guidance),
                shift=float(shift) if shift else None)


def optional_flow_settings(handler):
    """`handler` (taking the form as **fields) with the two settings optional in the API (None: the model's own):
    gradio makes an input whose component starts empty a required API parameter, unless the handler's own
    signature gives it a None default."""
    signature = inspect.signature(handler)
    parameters = list(signature.parameters.values())
    optional = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                for name in ("distilled_guidance", "shift")]
    handler.__signature__ = signature.replace(parameters=parameters[:-1] + optional + parameters[-1:])
    return handler

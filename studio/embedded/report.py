"""The embedded family's report card: every measure of studio/embedded/evaluation.py and sketches.py in one table,
as `python -m studio.embedded evaluate` prints it (docs/embedded-model.md quotes it).

Every number comes from fixed seeds, so two runs on one machine print the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.embedded import sketches
from studio.embedded.evaluation import (
    BARS,
    EVAL_SEED,
    evaluate_clip,
    evaluate_cutting_masks,
    evaluate_inpaint,
    evaluate_text_to_image,
    evaluate_upscaler,
    evaluate_vae,
    evaluation_scenes,
    plain_caption,
)


@dataclass
class Report:
    text_to_image: dict = field(default_factory=dict)  # {"seen": {...}, "held-out": {...}}
    plain_prompts: dict = field(default_factory=dict)  # the same, for prompts without size or position
    inpaint: dict = field(default_factory=dict)
    cutting_masks: dict = field(default_factory=dict)  # inpainting a mask that cuts through a shape
    inpaint_sketch: dict = field(default_factory=dict)  # a shape sketched over another (Inpaint sketch)
    upscaler: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)



def evaluate(models_dir: Path, prompt_count: int = 200, inpaint_count: int = 100, upscaler_count: int = 50,
             clip_count: int = 200) -> Report:
    torch.manual_seed(EVAL_SEED)
    return Report(
        text_to_image=evaluate_text_to_image(models_dir, prompt_count),
        plain_prompts=evaluate_text_to_image(models_dir, prompt_count // 2, seed=EVAL_SEED + 4, caption_of=plain_caption),
        inpaint=evaluate_inpaint(models_dir, inpaint_count),
        cutting_masks=evaluate_cutting_masks(models_dir, inpaint_count),
        inpaint_sketch=sketches.evaluate_inpaint_sketch(models_dir, inpaint_count),
        upscaler=evaluate_upscaler(models_dir, upscaler_count),
        clip=evaluate_clip(models_dir, clip_count),
        vae=evaluate_vae(models_dir),
    )


def _verdict(value: float, bar: float) -> str:
    return "met" if value >= bar else "NOT met"


def format_table(report: Report) -> str:
    lines = ["| measure | seen | held-out | bar | |", "|---|---|---|---|---|"]
    t2i = report.text_to_image
    for key in ("colour", "background", "shape", "position", "size"):
        seen, held = t2i["seen"][key], t2i["held-out"][key]
        bar = BARS.get(key)
        verdict = _verdict(min(seen, held), bar) if bar else ""
        lines.append(f"| text to image: {key} | {seen:.1%} | {held:.1%} | {f'≥ {bar:.0%}' if bar else '—'} | {verdict} |")
    lines.append(f"| (text-to-image prompts) | {t2i['seen']['n']} | {t2i['held-out']['n']} | | |")
    plain = report.plain_prompts
    if plain:
        for key in ("colour", "background", "shape"):
            seen, held = plain["seen"][key], plain["held-out"][key]
            lines.append(f"| prompts without size or position: {key} | {seen:.1%} | {held:.1%} | ≥ {BARS[key]:.0%} | {_verdict(min(seen, held), BARS[key])} |")
        lines.append(f"| (prompts like \"{plain_caption(evaluation_scenes(1)[0][0])}\") | {plain['seen']['n']} | {plain['held-out']['n']} | | |")
    clip = report.clip
    lines.append(f"| CLIP: right caption first of 8 | {clip['seen']:.1%} | {clip['held-out']:.1%} | ≥ 90% | {_verdict(min(clip['seen'], clip['held-out']), BARS['clip_top1'])} |")
    inpaint = report.inpaint
    key = "right shape and colour inside the mask"
    lines.append(f"| inpaint: {key} | {inpaint[key]:.1%} (n={inpaint['n']}, both) | | ≥ 85% | {_verdict(inpaint[key], BARS['inpaint'])} |")
    lines.append(f"| inpaint: outside pixels identical | {inpaint['outside pixels identical (after paste-back)']:.0%} | | 100% | |")
    lines.append(f"| inpaint: mean change outside before paste-back | {inpaint['mean |change| outside before paste-back (0-255)']:.2f} / 255 | | | |")
    cut = report.cutting_masks
    if cut:
        lines.append(f"| inpaint, a brush stroke through a shape: one clean shape | {cut['coherent']:.1%} (n={cut['n']}) | | "
                     f"≥ 85% | {_verdict(cut['coherent'], BARS['inpaint'])} |")
    sketch = report.inpaint_sketch
    if sketch:
        lines.append(f"| inpaint sketch, a shape sketched over another: one clean shape, no ghost | "
                     f"{sketch['clean']:.1%} (n={sketch['n']}; covering it {sketch['covering']:.0%}, most of it "
                     f"{sketch['mostly covering']:.0%}) | | ≥ 85% | {_verdict(sketch['clean'], BARS['inpaint'])} |")
        lines.append(f"| inpaint sketch: and at the sketched size and place | {sketch['as sketched']:.1%} | | | |")
    up = report.upscaler
    lines.append(f"| upscaler ×4 PSNR (bicubic) | | {up['psnr']:.2f} dB ({up['bicubic_psnr']:.2f} dB) | bicubic + 2 dB | {_verdict(up['gain_db'], BARS['upscaler_gain_db'])} (+{up['gain_db']:.2f} dB) |")
    vae = report.vae
    lines.append("| VAE round trip, oracle agrees (shape/colour/bg/position) | " + " / ".join(f"{vae[f'vae_{k}']:.1%}" for k in ("shape", "colour", "background", "position")) + " (all triples) | | ≥ 99% | "
                 + _verdict(min(vae.values()), BARS["vae"]) + " |")
    return "\n".join(lines)

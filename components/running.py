"""What every generating tab does around the engine call: progress updates, messages, gallery outputs."""

from __future__ import annotations

import time

import gradio as gr

PROGRESS_INTERVAL_S = 0.1


def throttled(progress: gr.Progress):
    """An on_progress(done, total, description) callback for the engine. Each update is a message to the
    browser; a few per second is smooth and keeps the cores for torch."""
    last_update = 0.0

    def on_progress(done: int, total: int, description: str) -> None:
        nonlocal last_update
        now = time.monotonic()
        if now - last_update >= PROGRESS_INTERVAL_S or done == total:
            last_update = now
            progress((done, total), desc=description, unit="steps")

    return on_progress


def gallery_outputs(result, batch_size: int) -> tuple[list, list[int], str]:
    """Shows the engine's warnings and a note when Stop cut the batch short; returns (gallery items, seeds,
    generation info of the first image)."""
    for warning in result.warnings:
        gr.Warning(warning)
    if result.interrupted:
        gr.Info(f"Stopped: {len(result.images)} of {batch_size} image(s) returned"
                + (" (the last one is unfinished)." if result.images else "."))
    items = [(item.image, f"Seed {item.seed}") for item in result.images]
    return items, result.seeds, "\n\n".join(item.parameters for item in result.images[:1])

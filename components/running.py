"""What every generating tab does around the engine call: progress updates, messages, gallery outputs."""

from __future__ import annotations

import time
from collections.abc import Callable

import gradio as gr

from studio.errors import StudioError
from studio.generation import GenerationResult
from studio.sessions import CancelRegistry

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


def session_of(request: gr.Request | None) -> str:
    return request.session_hash if request else "anonymous"


def run_for_session(cancels: CancelRegistry, request: gr.Request | None, work: Callable[..., GenerationResult],
                    batch_size: int, error_title: str) -> tuple[list, list[int], str]:
    """Runs `work(cancel)` as the session's request, so its Stop button reaches it; engine errors become a
    message in the browser. Returns the gallery outputs."""
    with cancels.running(session_of(request)) as cancel:
        try:
            result = work(cancel)
        except StudioError as error:
            raise gr.Error(str(error), title=error_title) from None
    return gallery_outputs(result, batch_size)


def wire_stop(stop: gr.Button, cancels: CancelRegistry) -> None:
    """Stop sets the session's cancel event rather than using gradio's `cancels=`, which would throw away the
    images already made: the handler returns them, the last one decoded where the denoising stopped."""

    def stop_running(request: gr.Request):
        cancels.cancel(session_of(request))

    stop.click(stop_running, None, None, api_visibility="private", concurrency_limit=None, show_progress="hidden")

"""How often gradio's queue looks for work, made less often.

gradio 6.31's queue has no wake-up signal: two loops on the server's event loop poll instead. One looks for a
queued event to start every `sleep_when_free` seconds (1 ms on Linux), the other for progress to send every
`progress_update_sleep_when_free` (10 ms), whether or not anything is queued or running (gradio/queueing.py:
Queue.start_processing, start_progress_updates). An idle `python app.py` used 4.7% of a core (measured on the 2-core
machine: /proc/<pid>/stat over 20 s), and the same wake-ups compete with a running image for the CPU and the GIL.

Every 5 ms and 50 ms instead: 1.9% of a core idle (the rest is the server's other loops). A queued request starts
at most 5 ms later than it would have, on images that take seconds; progress reaches the page within 50 ms, where
the jobs post it every 100 ms anyway (components/running.py)."""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("studio.requests")

QUEUE_POLL_S = 0.005
PROGRESS_POLL_S = 0.05


def poll_the_queue_less_often(demo: gr.Blocks) -> bool:
    """Sets the polling intervals of `demo`'s queue (call after `demo.queue(...)`); returns whether they are set
    (a gradio whose queue has no such attributes keeps its own, with a warning)."""
    queue = getattr(demo, "_queue", None)
    names = ("sleep_when_free", "progress_update_sleep_when_free")
    if queue is None or not all(isinstance(getattr(queue, name, None), float) for name in names):
        log.warning("gradio %s's queue has no polling intervals to set: it keeps its own", gr.__version__)
        return False
    # never more often than gradio's own (a later gradio may poll less often still)
    queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, PROGRESS_POLL_S)
    return True

"""What every generating tab does around the engine: a job per request (its own Stop, its progress), model files
fetched before the GPU work, the GPU function (spaces.GPU on ZeroGPU), messages, and gallery outputs."""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import functools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from components.event_options import INSTANT
from studio.core.errors import InvalidRequest, StudioError
from studio.core.jobs import JobBoard, Preview
from studio.core.sessions import RateLimiter
from studio.tasks.requests import GenerationResult
from studio.tasks.sampling import SamplingEngine, SamplingPlan

PROGRESS_INTERVAL_S = 0.1
PREVIEW_INTERVAL_S = 0.1  # how often a watched job's latest preview is looked for
PREVIEW, RESULT = "preview", "result"  # what a job's run yields
FORMING = "Forming…"  # a live preview's caption begins so (never a finished image's)
REMEMBERED_FAILURES = 1000  # sessions whose last failed job's reason is kept for their page
log = logging.getLogger("studio.requests")

# (function, duration(plan, slot) -> seconds) -> the function as the GPU runs it (spaces.GPU on ZeroGPU)
GpuWrapper = Callable[[Callable, Callable], Callable]


def session_of(request: gr.Request | None) -> str:
    return request.session_hash if request and request.session_hash else "anonymous"


def user_error(error: StudioError, title: str) -> gr.Error:
    """A user's mistake or a model that cannot be had: one line in the log, the message in the browser."""
    log.info("%s: %s", title, str(error).splitlines()[0] if str(error) else type(error).__name__)
    return gr.Error(str(error), title=title, print_exception=False)  # a traceback is for real faults only


@dataclass(frozen=True)
class DeviceCall:
    """One engine's plans run by its manager's GPU function: `call(plan, slot)`."""

    engine: str
    gpu: Callable[[str, Any, int], Any]

    def __call__(self, plan, slot: int):
        return self.gpu(self.engine, plan, slot)


@dataclass
class JobRunner:
    """Jobs, Stop, the rate limit and the GPU function, for every tab."""

    board: JobBoard
    gpu: GpuWrapper = lambda fn, duration: fn
    limiter: RateLimiter | None = None
    concurrency: int = 4  # jobs in flight at once; they take turns on the device between images

    def __post_init__(self):
        # the threads watched jobs run on (Text to image streams its previews): kept, as gradio keeps its handlers'
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency,
                                                              thread_name_prefix="watched-job")
        self._device_functions: dict[int, Callable] = {}  # id(manager) -> its GPU function
        self._engines: dict[str, Any] = {}  # engine name -> the engine that runs its plans
        self._counted: dict[tuple[str, str], int] = {}  # requests already counted by the rate limit when queued
        # (session, tab) -> why its last job failed, until its page reads it (API callers never do: bounded)
        self._failures: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def device_function(self, name: str, engine) -> DeviceCall:
        """The GPU work of the engine registered as `name` ("text_to_image", "inpaint", ...), as spaces.GPU can
        run it: plain, picklable arguments (the engine's name, the plan, the job's slot number) and result; its
        duration is the plan's own estimate. One GPU function per memory manager, for every tab: spaces keeps a
        GPU worker per function, and each new worker moves every preloaded model again. Every tab registers its
        engine before the first job: a worker forked earlier would not know a later one."""
        board, engines = self.board, self._engines

        def run_on_device(engine_name: str, plan, slot: int):
            try:
                return engines[engine_name].run(plan, board.attach(slot))
            except StudioError as error:  # crosses ZeroGPU's process boundary as a gradio error
                raise gr.Error(str(error), print_exception=False) from None

        manager = getattr(engine, "manager", None) or engine.stages.manager
        with self._lock:
            if engines.setdefault(name, engine) is not engine:
                raise ValueError(f"Another engine is already registered as {name!r}.")
            key = id(manager)
            if key not in self._device_functions:
                self._device_functions[key] = self.gpu(run_on_device, lambda engine_name, plan, slot: plan.gpu_seconds)
            return DeviceCall(name, self._device_functions[key])

    def submitted(self, request: gr.Request | None, tab: str) -> None:
        """Called by a tab's instant check, before the request waits in the queue: it counts against the rate
        limit now (so one visitor cannot fill the queue), and Stop can reach it while it waits."""
        session = session_of(request)
        self._count(session, tab)
        with self._lock:
            self._counted[(session, tab)] = self._counted.get((session, tab), 0) + 1
        self.board.submitted(session, tab)

    def _count(self, session: str, tab: str) -> None:
        if self.limiter:
            try:
                self.limiter.check(session)
            except StudioError as error:
                raise user_error(error, "Please wait") from None

    def _count_unless_queued_from_the_page(self, session: str, tab: str) -> None:
        """API callers skip the instant check: their requests are counted when they start."""
        with self._lock:
            queued = self._counted.get((session, tab), 0)
            if queued:
                self._counted[(session, tab)] = queued - 1
                if queued == 1:
                    del self._counted[(session, tab)]
        if not queued:
            self._count(session, tab)

    def run(self, tab: str, request: gr.Request | None, progress: gr.Progress, engine: SamplingEngine,
            plan_for: Callable[[], SamplingPlan], device_function: Callable,
            finish: Callable[[GenerationResult], GenerationResult] = lambda result: result,
            error_title: str = "Cannot generate") -> tuple[list, list[int], str]:
        """A generating tab's job; returns the gallery outputs."""
        plan, result = self.run_job(tab, request, progress, engine, plan_for, device_function, error_title)
        return gallery_outputs(finish(result), plan.batch_size)

    def stream(self, tab: str, request: gr.Request | None, progress: gr.Progress, engine: SamplingEngine,
               plan_for: Callable[[], SamplingPlan], device_function: Callable,
               finish: Callable[[GenerationResult], GenerationResult] = lambda result: result,
               error_title: str = "Cannot generate") -> Iterator[tuple]:
        """A generating tab's job as a generator handler: the gallery outputs of each live preview as it comes
        (seeds and info are left as they are), then the result's. The gallery keeps the previous result until the
        first preview arrives."""
        yield from self.stream_job(tab, request, progress, engine, plan_for, device_function, error_title,
                                   gallery_preview,
                                   lambda plan, result: gallery_outputs(finish(result), plan.batch_size))

    def stream_job(self, tab: str, request: gr.Request | None, progress: gr.Progress, engine,
                   plan_for: Callable[[], Any], device_function: Callable, error_title: str,
                   preview_outputs: Callable[[Any, str, int], tuple], result_outputs: Callable[[Any, Any], tuple],
                   shown: Callable[[Image.Image], Any] = lambda image: image) -> Iterator[tuple]:
        """A tab's job as a generator handler: for each live preview, preview_outputs(what the page shows of it,
        its caption, its part), then result_outputs(plan, result). What the page shows of a preview, `shown(image)`
        (an image or a tuple of them), is made once per preview and handed over as PNG files.

        Files, not images: a preview is yielded again with a new caption while the job's text changes, and gradio
        writes an image output to its cache under the hash of its bytes, truncating the file in place: a second
        write of the same image raced the page's (or a client's) read of the first, which then read an empty file.
        A file output is copied into the cache once, atomically."""
        session = session_of(request)
        try:
            with tempfile.TemporaryDirectory(prefix="previews-") as folder:
                files = PreviewFiles(Path(folder), shown)
                for kind, value in self._run_job(session, tab, progress, engine, plan_for, device_function,
                                                 error_title, previews=True):
                    if kind == PREVIEW:
                        preview, text = value
                        yield preview_outputs(files.of(preview), f"{FORMING} {text}".strip(), preview.part)
                    else:
                        yield result_outputs(*value)
        except gr.Error as error:
            self._remember_failure(session, tab, str(error.message))
            raise

    def run_job(self, tab: str, request: gr.Request | None, progress: gr.Progress, engine,
                plan_for: Callable[[], Any], device_function: Callable, error_title: str) -> tuple[Any, Any]:
        """Plan (CPU), fetch the model files (outside the device lock), run the device work as this tab's job;
        returns (plan, result). `engine` has `model_files(plan, on_progress)`, which yields the plan resolved
        against the files (what runs)."""
        session = session_of(request)
        try:
            for _, made in self._run_job(session, tab, progress, engine, plan_for, device_function, error_title):
                return made  # without previews, the run yields its result only
        except gr.Error as error:  # kept for the tab's Generation info: the toast fades in seconds
            self._remember_failure(session, tab, str(error.message))
            raise

    def _run_job(self, session: str, tab: str, progress: gr.Progress, engine, plan_for: Callable[[], Any],
                 device_function: Callable, error_title: str, previews: bool = False) -> Iterator[tuple[str, Any]]:
        """(PREVIEW, image) for each live preview while the job runs (with `previews`), then (RESULT, (plan,
        result))."""
        self._count_unless_queued_from_the_page(session, tab)
        try:
            plan = plan_for()
        except StudioError as error:
            raise user_error(error, error_title) from None
        # The model files are fetched first, and stay protected from the cache budget until the job is done.
        try:
            with engine.model_files(plan, throttled(progress)) as plan:
                job = self.board.open(session, tab, previews=previews)
                draining: list[concurrent.futures.Future] = []  # a watched job still running when its handler left
                try:
                    if previews:
                        result = yield from self._watched(lambda: device_function(plan, job.slot), job, progress,
                                                          draining)
                    else:
                        result = follow_progress(lambda: device_function(plan, job.slot), job, progress)
                except gr.Error as error:  # an engine error raised on the GPU side: said once, with this tab's title
                    log.info("%s: %s", error_title, str(error.message).splitlines()[0])
                    raise gr.Error(error.message, title=error_title, print_exception=False) from None
                finally:
                    if draining:  # its slot is freed when its work ends, never under it
                        draining[0].add_done_callback(lambda _: self.board.close(job))
                    else:
                        self.board.close(job)
        except StudioError as error:  # the model files could not be had
            raise user_error(error, error_title) from None
        yield RESULT, (plan, result)

    def _watched(self, work: Callable, job, progress: gr.Progress, draining: list):
        """Runs `work()` on one of the runner's own threads (kept from job to job, as a handler's thread is) while
        this generator yields (PREVIEW, (Preview, its step)) for each new preview the job shows, and the last preview
        again when the job's progress text changes without one (waiting for its turn, decoding); returns work's
        result. A handler closed early (the visitor left; gradio closes it on its event loop) stops the job and
        puts its future in `draining` without waiting for it, so the server never waits on a job nobody watches.

        Once a preview shows, the progress bar is left: gradio draws it over the output, so the forming image
        would be hidden under it; the preview's caption says the step instead."""
        context = contextvars.copy_context()  # gradio's progress and spaces' request live in context variables
        previewing = threading.Event()

        def progress_until_a_preview(*args, **kwargs):
            if not previewing.is_set():
                progress(*args, **kwargs)

        future = self._workers.submit(context.run, follow_progress, work, job, progress_until_a_preview)
        seen, last, said = 0, None, ""
        try:
            while not concurrent.futures.wait([future], PREVIEW_INTERVAL_S).done:
                preview = job.latest_preview(seen)
                text = job.progress()[2]
                if preview.image is not None or (last is not None and text != said):
                    seen, last, said = preview.number, preview if preview.image is not None else last, text
                    previewing.set()
                    yield PREVIEW, (last, text)
            return future.result()  # its error, if it failed, raised here
        finally:
            if not future.done():
                job.stop()
                draining.append(future)

    def _remember_failure(self, session: str, tab: str, message: str) -> None:
        with self._lock:
            self._failures[(session, tab)] = message
            self._failures.move_to_end((session, tab))
            while len(self._failures) > REMEMBERED_FAILURES:
                self._failures.popitem(last=False)

    def failure_of(self, session: str, tab: str) -> str | None:
        """Why this session's last job in `tab` failed (once: it is forgotten when read)."""
        with self._lock:
            return self._failures.pop((session, tab), None)

    def remembering_refusals(self, tab: str, check: Callable) -> Callable:
        """A tab's instant check (a handler given the gr.Request) that also remembers why it refused a request,
        for follow_results to say in Generation info."""

        @functools.wraps(check)  # gradio reads the signature through it, to pass the request
        def checked(*args, **kwargs):
            try:
                return check(*args, **kwargs)
            except gr.Error as error:
                request = next((value for value in (*args, *kwargs.values()) if isinstance(value, gr.Request)), None)
                self._remember_failure(session_of(request), tab, str(error.message))
                raise

        return checked

    def follow_results(self, tab: str, started: list, jobs: list, seeds: gr.JSON, info: gr.Textbox,
                       gallery: gr.Gallery) -> None:
        """Used seeds and Generation info never show the previous image's values as the new one's: emptied when
        a request passes its instant check (`started`); when the check refuses it (see remembering_refusals) or
        its job (`jobs`) fails, Generation info says why, where it stays (the error's toast fades), and the
        results are emptied too, so that no earlier image stands beside "No image" as if this request made it (it
        is in the session's History)."""

        def failed(request: gr.Request):
            reason = self.failure_of(session_of(request), tab)
            return (None, None,
                    f"No image: {reason}" if reason else "No image: the request failed (see the error message).")

        for event in started:
            event.success(lambda: (None, ""), None, [seeds, info], **INSTANT)
            event.failure(failed, None, [gallery, seeds, info], **INSTANT)
        for event in jobs:
            event.failure(failed, None, [gallery, seeds, info], **INSTANT)

    def wire_stop(self, stop: gr.Button, tab: str) -> None:
        """Stop cancels this tab's job of this session, nothing else. It sets the job's flag rather than using
        gradio's `cancels=`, which would throw away the images already made."""
        board = self.board

        def stop_job(request: gr.Request):
            board.cancel(session_of(request), tab)

        # not queued: a full queue must not refuse a Stop
        stop.click(stop_job, None, None, **INSTANT)


# gradio stacks the columns below this width (and app.py's CSS follows it)
NARROW_WINDOW = "(max-width: 767px)"


def scroll_to_results_in_a_narrow_window(checked, results_id: str) -> None:
    """In a narrow window (a phone) the columns stack and the results come after the whole form: once `checked`
    (a request's instant check) succeeds, the page scrolls to the element `results_id`, where the progress shows."""
    checked.success(None, js=f"""() => {{
  if (window.matchMedia("{NARROW_WINDOW}").matches) {{
    document.getElementById("{results_id}")?.scrollIntoView({{block: "start", behavior: "smooth"}});
  }}
}}""", **INSTANT)


def follow_progress(work: Callable, job, progress: gr.Progress):
    """Runs `work()` in this thread while a helper thread forwards the job's progress (written from wherever the
    work runs, even a forked GPU worker) to the browser a few times a second. Returns work's result or raises its
    error.

    The work stays in the handler's thread, which gradio's thread pool keeps for the next job, and torch's OpenMP
    threads with it. It used to run in a new thread per job: on the shared 2-core machine the same 20-step embedded
    image took 6-48% longer (median) when each call ran in a fresh thread than in a reused one while other work
    was running, the more the busier the machine (no difference when it was quiet). The helper only reads the job's
    progress and waits on an event, so it ends as soon as the work does, not at its next tick."""
    finished = threading.Event()
    context = contextvars.copy_context()  # gradio's Progress finds its event through context variables

    def forward():
        last = None
        while not finished.wait(PROGRESS_INTERVAL_S):
            done, total, text = job.progress()
            if total and (done, total, text) != last:  # a new text (loading, then the steps) is shown too
                last = (done, total, text)
                context.run(progress, (done, total), desc=text, unit="steps")

    forwarder = threading.Thread(target=forward, daemon=True, name="job-progress")
    forwarder.start()
    try:
        return work()  # with the handler's own context variables (spaces reads the request from one)
    finally:
        finished.set()
        forwarder.join()


def throttled(progress: gr.Progress):
    """An on_progress(done, total, text) callback: a few updates per second keep the page smooth."""
    last_update, last_kind = 0.0, ""

    def on_progress(done: int, total: int, text: str) -> None:
        nonlocal last_update, last_kind
        now = time.monotonic()
        # a new kind of work (e.g. hashing after downloading: the text before its counts) is always shown
        kind = text.partition(":")[0]
        if now - last_update >= PROGRESS_INTERVAL_S or done == total or kind != last_kind:
            last_update, last_kind = now, kind
            # a fraction, not "done/total steps": these count bytes (the text says how many)
            progress(done / total if total else 0.0, desc=text)

    return on_progress


class PreviewFiles:
    """What the page shows of each preview (`shown(image)`: an image, or a tuple of them), saved once as PNG
    files in a job's folder: the same preview yielded again is the same files."""

    def __init__(self, folder: Path, shown: Callable[[Image.Image], Any]):
        self.folder, self.shown = folder, shown
        self.number, self.paths = -1, None

    def of(self, preview: Preview):
        if preview.number != self.number:
            made = self.shown(preview.image)
            images = made if isinstance(made, tuple) else (made,)
            paths = []
            for index, image in enumerate(images):
                path = self.folder / f"preview-{preview.number}-{index}.png"
                image.save(path, compress_level=1)  # fast: 512 px in about half the default's time
                paths.append(str(path))
            self.number, self.paths = preview.number, tuple(paths) if isinstance(made, tuple) else paths[0]
        return self.paths


def gallery_preview(shown: str, caption: str, part: int = 0) -> tuple:
    """A generating tab's outputs (gallery, seeds, info) while a preview shows: the preview alone in the gallery."""
    return [(shown, caption)], gr.skip(), gr.skip()


def gallery_outputs(result, batch_size: int) -> tuple[list, list[int], str]:
    """Shows the engine's warnings and a note when Stop cut the batch short; returns (gallery items, seeds,
    generation info of the first image)."""
    for warning in result.warnings:
        gr.Warning(warning)
    if result.interrupted:
        unfinished = [item for item in result.images if item.stopped_at]
        gr.Info(f"Stopped: {len(result.images)} of {batch_size} image(s) returned"
                + (f"; the last one is unfinished (stopped at step {unfinished[-1].stopped_at})." if unfinished
                   else "."))
    items = [(item.image, item.caption) for item in result.images]
    return items, result.seeds, "\n\n".join(item.parameters for item in result.images[:1])


def chosen_result(gallery, index, when_empty: str):
    """The gallery image last clicked (the first until one is), or a toast saying `when_empty`."""
    if not gallery:
        raise user_error(InvalidRequest([when_empty]), "Nothing to send")
    image, caption = gallery[min(index or 0, len(gallery) - 1)]
    if (caption or "").startswith(FORMING):  # a live preview, not an image with its parameters
        raise user_error(InvalidRequest(["The image is still forming: send it once it is done."]), "Not done yet")
    return image

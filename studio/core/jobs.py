"""Jobs: what every tab submits. Each job has its own cancel handle and one progress total, and a cost
estimate that ZeroGPU books GPU time from.

On ZeroGPU the GPU work runs in a *forked* worker process (spaces keeps one per GPU), so a threading.Event set
by Stop in the main process would never reach it, nor would the worker's progress reach the page. A JobBoard
therefore keeps each job's cancel flag, progress and latest live preview (a small RGB image) in shared memory
created *before* any fork; the GPU function gets only the job's slot number (an int crosses the process boundary)
and attaches to the same slot on its side of the fork. Without ZeroGPU the very same code runs in one process.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import NamedTuple

import numpy as np
from PIL import Image

TEXT_BYTES = 120
# A live preview crosses the fork at most this many pixels a side (a larger one is scaled down first): SDXL's 1024 px
# image is 128 latents a side, a Compare grid's or an upscale's preview is an image of the whole, cells or tiles
# filling in. 768 KiB of shared memory per preview lane: a watched job takes one of a few lanes (the jobs on the
# device at once), not one per job slot.
PREVIEW_SIDE = 512
PREVIEW_LANES = 16
PENDING_TTL_SECONDS = 3600  # a Stop pressed for a job that never started (tab closed) is forgotten after this


class JobControl:
    """What running work sees of its job: whether it was cancelled, and where to report progress."""

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    def report(self, done: int, total: int, text: str) -> None:
        raise NotImplementedError

    def show(self, preview: Image.Image, part: int = 0) -> None:
        """A live preview of the image being made (the latest replaces the one before); `part`: which of the job's
        images it is (the Arena's left or right). Ignored by default."""

    @property
    def wants_previews(self) -> bool:
        """Whether anyone looks at this job's previews (making one costs a little at each step)."""
        return False

    def preview_wanted_now(self) -> bool:
        """Whether a preview made now would be shown (a Compare grid draws at most 10 a second): asked before one
        is made, so that none is decoded to be dropped."""
        return True

    @property
    def owner(self) -> object:
        """The job this is (a part of): the memory manager keeps a job's LoRA patches across its turns."""
        return self


class LocalJob(JobControl):
    """A job in this process only (tests, scripts): a threading.Event and an optional progress callback."""

    def __init__(self, on_progress: Callable[[int, int, str], None] | None = None,
                 cancel: threading.Event | None = None, on_preview: Callable[[Image.Image, int], None] | None = None):
        self.cancel_event = cancel or threading.Event()
        self.on_progress = on_progress
        self.on_preview = on_preview

    def show(self, preview: Image.Image, part: int = 0) -> None:
        if self.on_preview:
            self.on_preview(preview, part)

    @property
    def wants_previews(self) -> bool:
        return self.on_preview is not None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def report(self, done: int, total: int, text: str) -> None:
        if self.on_progress:
            self.on_progress(done, total, text)


class Preview(NamedTuple):
    """What a job's lane holds: the number of its latest preview (0: none yet), and, when asked for one newer than a
    number, that preview's image and part (else None)."""

    number: int
    image: Image.Image | None = None
    part: int = 0


class SlotJob(JobControl):
    """A job's view of its shared-memory slot; valid on both sides of a fork."""

    def __init__(self, board: JobBoard, slot: int):
        self.board = board
        self.slot = slot

    @property
    def cancelled(self) -> bool:
        return bool(self.board._cancel[self.slot])

    def report(self, done: int, total: int, text: str) -> None:
        self.board._write_progress(self.slot, done, total, text)

    def progress(self) -> tuple[int, int, str]:
        return self.board._read_progress(self.slot)

    def show(self, preview: Image.Image, part: int = 0) -> None:
        self.board._write_preview(self.slot, preview, part)

    def stop(self) -> None:
        """Cancel this job (its handler is gone: nobody waits for its images)."""
        self.board._cancel[self.slot] = True

    @property
    def wants_previews(self) -> bool:
        return self.board._lane_of[self.slot] >= 0

    def latest_preview(self, after: int = 0) -> Preview:
        """The latest preview if one newer than number `after` was shown, else Preview(after)."""
        return self.board._read_preview(self.slot, after)


@dataclass
class _Open:
    job: SlotJob
    session: str
    tab: str


class JobBoard:
    """The jobs in flight, keyed by (session, tab): Stop in one tab cancels that tab's job and nothing else.
    Create it once, in the main process, before ZeroGPU forks its worker."""

    def __init__(self, slots: int = 128, preview_lanes: int = PREVIEW_LANES):
        self._cancel = RawArray(ctypes.c_bool, slots)
        self._done = RawArray(ctypes.c_long, slots)
        self._total = RawArray(ctypes.c_long, slots)
        self._text = RawArray(ctypes.c_char, slots * TEXT_BYTES)
        lanes = min(slots, preview_lanes)
        self._lane_of = RawArray(ctypes.c_int, [-1] * slots)  # a watched job's preview lane (-1: none)
        # a preview per lane: its pixels, size, part and a sequence number, odd while the writer is at work (a
        # reader that sees it odd, or changed under it, leaves that preview and takes the next)
        self._preview_pixels = RawArray(ctypes.c_ubyte, lanes * PREVIEW_SIDE * PREVIEW_SIDE * 3)
        self._preview_size = RawArray(ctypes.c_int, lanes * 3)
        self._preview_sequence = RawArray(ctypes.c_long, lanes)
        self._free_lanes = list(range(lanes))
        self._free = list(range(slots))
        self._open: dict[int, _Open] = {}
        self._stopped_early: dict[tuple[str, str], float] = {}  # Stop pressed while the job waited in the queue
        self._submitted: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def submitted(self, session: str, tab: str) -> None:
        """The tab's request is queued: a Stop from now on (even before the job opens) applies to it."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, t in self._submitted.items() if now - t > PENDING_TTL_SECONDS]:
                self._submitted.pop(key, None)
                self._stopped_early.pop(key, None)
            self._submitted[(session, tab)] = now
            self._stopped_early.pop((session, tab), None)

    def open(self, session: str, tab: str, previews: bool = False) -> SlotJob:
        """A slot for the tab's job; `previews`: its work shows live previews (someone will read them), in a
        lane of their own while one is free (else the job runs without: more jobs watched than lanes)."""
        with self._lock:
            if not self._free:
                raise RuntimeError("Too many jobs at once: every job slot is taken.")
            slot = self._free.pop()
            self._cancel[slot] = self._stopped_early.pop((session, tab), None) is not None
            lane = self._free_lanes.pop() if previews and self._free_lanes else -1
            if lane >= 0:
                self._preview_sequence[lane] = 0
            self._lane_of[slot] = lane
            self._submitted.pop((session, tab), None)
            job = SlotJob(self, slot)
            self._open[slot] = _Open(job, session, tab)
        self._write_progress(slot, 0, 0, "")
        return job

    def close(self, job: SlotJob) -> None:
        with self._lock:
            if self._open.pop(job.slot, None) is not None:
                if self._lane_of[job.slot] >= 0:
                    self._free_lanes.append(self._lane_of[job.slot])
                    self._lane_of[job.slot] = -1
                self._free.append(job.slot)

    def attach(self, slot: int) -> SlotJob:
        """The job in `slot`, from the other side of a fork (the GPU worker)."""
        return SlotJob(self, slot)

    def cancel(self, session: str, tab: str) -> int:
        """Stop the tab's running job, or the one it has queued. Returns how many jobs were told."""
        with self._lock:
            told = 0
            for slot, entry in self._open.items():
                if entry.session == session and entry.tab == tab:
                    self._cancel[slot] = True
                    told += 1
            if (session, tab) in self._submitted:
                self._stopped_early[(session, tab)] = time.monotonic()
                told += 1
            return told

    def _write_progress(self, slot: int, done: int, total: int, text: str) -> None:
        encoded = text.encode("utf-8")[: TEXT_BYTES - 1].ljust(TEXT_BYTES, b"\0")
        self._text[slot * TEXT_BYTES:(slot + 1) * TEXT_BYTES] = encoded
        self._total[slot] = total
        self._done[slot] = done

    def _write_preview(self, slot: int, preview: Image.Image, part: int) -> None:
        lane = self._lane_of[slot]
        if lane < 0:  # nobody watches this job
            return
        preview = preview.convert("RGB")
        if max(preview.size) > PREVIEW_SIDE:
            preview = preview.copy()
            preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
        pixels = np.asarray(preview, dtype=np.uint8).reshape(-1)
        start = lane * PREVIEW_SIDE * PREVIEW_SIDE * 3
        sequence = self._preview_sequence[lane]
        self._preview_sequence[lane] = sequence + 1  # odd: being written
        np.frombuffer(self._preview_pixels, dtype=np.uint8)[start:start + pixels.size] = pixels
        self._preview_size[3 * lane:3 * lane + 3] = [*preview.size, part]
        self._preview_sequence[lane] = sequence + 2

    def _read_preview(self, slot: int, after: int) -> Preview:
        lane = self._lane_of[slot]
        if lane < 0:
            return Preview(after)
        sequence = self._preview_sequence[lane]
        if sequence <= after or sequence % 2:
            return Preview(after)
        width, height, part = self._preview_size[3 * lane:3 * lane + 3]
        start = lane * PREVIEW_SIDE * PREVIEW_SIDE * 3
        pixels = np.frombuffer(self._preview_pixels, dtype=np.uint8)[start:start + width * height * 3].copy()
        if self._preview_sequence[lane] != sequence:  # rewritten while it was read: the next one will do
            return Preview(after)
        return Preview(sequence, Image.fromarray(pixels.reshape(height, width, 3)), part)

    def _read_progress(self, slot: int) -> tuple[int, int, str]:
        raw = bytes(self._text[slot * TEXT_BYTES:(slot + 1) * TEXT_BYTES]).split(b"\0", 1)[0]
        return self._done[slot], self._total[slot], raw.decode("utf-8", errors="ignore")


# ----- cost: what ZeroGPU books for a job -----

OVERHEAD_SECONDS = 8.0  # a new GPU worker: moving the preloaded models onto the GPU, inputs and results across
PER_IMAGE_STEPS = 4  # the encode, decode and safety check of an image cost about as much as a few steps
SAFETY_FACTOR = 1.5
MAX_SECONDS = 240


def gpu_seconds(preset, steps: int, images: int, pixels: int) -> int:
    """GPU seconds to book for `images` images of `steps` steps at `pixels` pixels each: the preset's seconds
    per step at its default size (an estimate in presets/models.yaml, to be measured on the Space), scaled by
    area, with a margin and a fixed allowance for a new worker."""
    native = preset.default_width * preset.default_height
    estimate = preset.seconds_per_step * (steps + PER_IMAGE_STEPS) * images * max(1.0, pixels / native)
    return int(min(MAX_SECONDS, OVERHEAD_SECONDS + SAFETY_FACTOR * estimate + 0.999))

"""Live previews: the image as it forms, shown while a pass runs, as every studio our users come from shows it
(A1111 and Forge every 10 steps by default, ComfyUI, Fooocus and InvokeAI every step).

A preview shows the sampler's latest estimate of the clean image (x0), as ComfyUI and A1111 preview the denoised
latents rather than the noisy ones, which are mostly noise until the last steps: "Fast" through the family's
latent-to-RGB factors (LatentFormat.preview: one small matrix product, a pixel per latent), "TAESD" decoded by the
family's tiny decoder (studio.models.preview_decoders: a few milliseconds, at the image's size). diffusers'
pipelines keep that estimate inside the scheduler's step, so `CleanEstimate` watches the step for it: Euler, Heun,
LMS, DDIM and the DPM2 family return it (`pred_original_sample`), LCM as `denoised`, the multistep solvers
(DPM++ 2M, UniPC) keep their data prediction as their latest model output, and flow matching's Euler gives it
from the velocity (x0 = x - sigma v). Watching changes nothing the step
computes: the final image is the same bit for bit with previews on and off (tested)."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from studio.core.downloads import HubDownloads
from studio.core.errors import ModelUnavailable
from studio.core.jobs import JobControl
from studio.models.families import ModelFamily, family_of
from studio.models.preview_decoders import FILES as DECODER_FILES
from studio.models.preview_decoders import decoder_download, preview_decoder_of, preview_image

log = logging.getLogger("studio.tasks.previews")
OFF, FAST, TAESD = "Off", "Fast", "TAESD"
LIVE_PREVIEWS = (OFF, FAST, TAESD)
# Every how many steps a preview is made: AUTO (0, the default) makes one as often as they take at most
# PREVIEW_BUDGET of the pass's time, whatever the model, decoder and device (the aim: previews must not slow
# the image by more than 3%). A fixed interval would not do: on the embedded model (~15 ms a step on 2 CPU cores) a
# Fast preview costs 0.6 ms, 4% of a step, and a TAESD one 8 ms, half a step (python bench/preview_cost.py); on a GPU
# both are a small share of an SD step. 1 to N: every N steps, as asked (ComfyUI and Fooocus show every step, A1111
# every 10), whatever it costs.
AUTO = 0
DEFAULT_PREVIEW_EVERY = AUTO
PREVIEW_BUDGET = 0.03
# a pass this long, or of this many steps, shows at least one preview, in its middle, whatever the budget allows (a
# preview's cost measured on a busy machine must not hold off every later short pass's previews)
MIN_PASS_S = 1.0
MIN_PASS_STEPS = 20


def preview_every_of(request, checked: bool, previews_of_checked_presets: bool = True) -> int | None:
    """A plan's preview interval from its request's live preview settings (AUTO or steps), None for no previews:
    Off, or where a safety checker looks at the preset's images here (`checked`: its own, or every preset's on a
    public demo) and the server says so (a public demo): a preview is not checked, and would show what the checker
    then hides."""
    if request.live_preview == OFF or (checked and not previews_of_checked_presets):
        return None
    return request.preview_every


class PreviewCosts:
    """What a preview takes, per way of making them (a TAESD's source, or Fast) and size (latent pixels): AUTO
    plans a pass's previews with it. One per engine: a job's passes and the next jobs learn from the last ones. The
    first preview of each kind is not counted (kernels warming up, a decoder's first call); then the median of the
    last few, so that one slow preview (the machine busy for a moment) does not hold the next ones off."""

    KEPT = 5

    def __init__(self):
        self._seconds: dict[tuple[str, int], collections.deque] = {}
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def expected(self, way: str, pixels: int) -> float:
        """Seconds a preview is expected to take; 0 while none has been counted."""
        with self._lock:
            kept = self._seconds.get((way, pixels))
            return statistics.median(kept) if kept else 0.0

    def record(self, way: str, pixels: int, seconds: float) -> None:
        key = (way, pixels)
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                return
            self._seconds.setdefault(key, collections.deque(maxlen=self.KEPT)).append(seconds)


class PreviewDecoders:
    """Which preset's TAESD can decode its previews here: one on disk or in the Hub cache, or one to fetch online,
    unless it failed to load here once; else the preset's previews are Fast ones. One per engine."""

    def __init__(self, downloads: HubDownloads):
        self.downloads = downloads
        self._unusable: set[str] = set()  # TAESDs that failed to load here

    def problem(self, preset) -> str | None:
        """Why TAESD previews cannot be had for the preset here (read without network), or None."""
        source = preview_decoder_of(preset)
        if source is None:
            return f"TAESD previews: there is no TAESD for {family_of(preset).label} models; choose Fast."
        if source in self._unusable:
            return f"TAESD previews: {source} could not be loaded here (see the server's log); choose Fast."
        download = decoder_download(source)
        if download is None:
            missing = [name for name in DECODER_FILES if not (Path(source) / name).is_file()]
            return None if not missing else (f"TAESD previews: the folder {source} has no {' or '.join(missing)}; "
                                             "choose Fast.")
        if self.downloads.is_offline() and not self.downloads.is_cached(download):
            return f"TAESD previews: {source} is not downloaded and this server is offline; choose Fast."
        return None

    def fetched(self, plan, protected: contextlib.ExitStack, on_progress=None):
        """The plan (a SamplingPlan) with its TAESD fetched, kept from the cache budget with the model's files; one
        that cannot be fetched costs the image nothing: its previews are Fast ones, and the result says so."""
        download = decoder_download(plan.preview_decoder) if plan.preview_decoder else None
        if download is None:
            return plan
        protected.enter_context(self.downloads.in_use(download.source))
        try:
            self.downloads.ensure(download, on_progress)
        except ModelUnavailable as error:
            return replace(plan, preview_decoder=None, warnings=[
                *plan.warnings, f"TAESD previews: {download.source} could not be fetched, so the previews were Fast "
                f"ones ({str(error).splitlines()[0]})"])
        return plan

    def failed_to_load(self, source: str, preset) -> None:
        """Said once in the log; the preset's later plans preview Fast (problem says why)."""
        log.warning("The TAESD %s could not be loaded; %s's previews are Fast ones", source, preset.name,
                    exc_info=True)
        self._unusable.add(source)


class CleanEstimate:
    """The scheduler's latest estimate of the clean latents, watched on its `step` (the instance's, for one pass)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.latest: torch.Tensor | None = None
        original = scheduler.step

        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, **kwargs):
            output = original(model_output, timestep, sample, *args, **kwargs)
            self.latest = clean_estimate(scheduler, output)
            if self.latest is None and hasattr(scheduler.config, "shift") and hasattr(scheduler, "sigmas"):
                # flow matching's Euler keeps no estimate: the velocity points from the clean image to the
                # noise, so x0 = x - sigma * v at the sigma this step started from
                sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device, sample.dtype)
                self.latest = sample - sigma * model_output
            return output

        scheduler.step = step


def clean_estimate(scheduler, output) -> torch.Tensor | None:
    """x0 from a scheduler step's output (a tuple or an output object) or the solver's own state; None where the
    scheduler gives none (the preview then shows the noisy latents)."""
    named = next((getattr(output, name) for name in ("pred_original_sample", "denoised")
                  if getattr(output, name, None) is not None), None)
    if named is not None:
        return named
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # (prev_sample, pred_original_sample) or LCM's (prev_sample, denoised)
    if getattr(scheduler.config, "algorithm_type", "").endswith("dpmsolver++") or getattr(
            scheduler.config, "predict_x0", False):
        outputs = getattr(scheduler, "model_outputs", None)
        if outputs and outputs[-1] is not None:
            return outputs[-1]  # the multistep solvers convert each model output to a data prediction
    return None


def latents_preview(family: ModelFamily, latents: torch.Tensor) -> Image.Image:
    """The first image of `latents` as an RGB preview at the latents' size (a pixel per latent)."""
    return rgb_image(family.latent.preview(latents[:1].detach())[0])


def decoded_preview(decoder, latents: torch.Tensor) -> Image.Image:
    """The first image of `latents` decoded by a TAESD (at the image's size)."""
    return rgb_image(preview_image(decoder, latents.detach()))


def rgb_image(rgb: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB image."""
    return Image.fromarray((rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def preview_maker(family: ModelFamily, decoder=None) -> Callable[[torch.Tensor], Image.Image]:
    """How a pass's previews are made from latents: the TAESD leased for it, or the family's factors."""
    if decoder is not None:
        return functools.partial(decoded_preview, decoder)
    return functools.partial(latents_preview, family)


def preview_step(job: JobControl, to_image: Callable[[torch.Tensor], Image.Image], estimate: CleanEstimate,
                 every: int, steps: int, then, costs: PreviewCosts | None = None, way: str = FAST):
    """A callback_on_step_end that shows a preview (`to_image` of the latest clean estimate) every `every` steps
    of a `steps`-step pass (and after its last), or with AUTO as many as fit in PREVIEW_BUDGET of the pass's time
    (`costs` of `way` say what one takes), spread over it; then calls `then` (progress, Stop)."""
    costs = costs or PreviewCosts()
    began, spent = time.perf_counter(), [0.0]  # seconds the pass's previews took
    shown, made = [0], [0]  # the last step shown (-1 once a preview failed: no more this pass); previews made

    def due(done: int, pixels: int) -> bool:
        if every != AUTO:
            return done % every == 0 or done == steps
        return done >= auto_step(made[0], done, pixels)

    def auto_step(previews: int, done: int, pixels: int) -> float:
        """The step at which AUTO makes the pass's next preview: the pass's time, projected from its steps so far,
        allows PREVIEW_BUDGET of it in previews (as long as they are expected to take), spread evenly, each in the
        middle of its share of the steps; at least one, in the middle, in a pass of MIN_PASS_S or more (so that
        a slow preview once does not turn previews off: each such pass measures again). A kind of preview never
        made yet is made at once (nothing is known of its cost)."""
        expected = costs.expected(way, pixels)
        if not expected:
            return done
        pass_seconds = (time.perf_counter() - began - spent[0]) / done * steps
        allowed = math.floor(PREVIEW_BUDGET * pass_seconds / expected)
        if pass_seconds >= MIN_PASS_S or steps >= MIN_PASS_STEPS:
            allowed = max(allowed, 1)
        if allowed < 1 or previews >= allowed:
            return math.inf
        return steps / allowed * (previews + 0.5)

    def on_step_end(pipe, step, timestep, callback_kwargs):
        # called once per model evaluation (twice a step for Heun, DPM2 and DPM++ SDE; Heun's last step once)
        done = min(steps, math.ceil((step + 1) / getattr(pipe.scheduler, "order", 1)))
        latents = estimate.latest if estimate.latest is not None else callback_kwargs["latents"]
        pixels = latents.shape[-2] * latents.shape[-1]
        if shown[0] >= 0 and done != shown[0] and job.preview_wanted_now() and due(done, pixels):
            shown[0] = done
            if latents.is_cuda:  # the step's kernels are still queued: not the preview's time
                torch.cuda.synchronize(latents.device)
            started = time.perf_counter()
            try:
                job.show(to_image(latents))
            except Exception:  # noqa: BLE001 - a preview is a courtesy: it must never cost the image
                log.exception("Live preview failed; this pass goes on without previews")
                shown[0] = -1
            took = time.perf_counter() - started
            spent[0] += took
            made[0] += 1
            costs.record(way, pixels, took)
        return then(pipe, step, timestep, callback_kwargs)

    return on_step_end

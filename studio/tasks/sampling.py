"""What Text to image and Inpaint share: the plan a job runs, the engine that runs it image by image (each image
a turn on the device, the prompt encoded once, progress, Stop), and the pipeline hooks of a denoising pass. The
requests, their limits and checks are studio.tasks.requests'."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

from studio.a1111.controlnet import controlnet_parameters
from studio.a1111.metadata import format_parameters
from studio.a1111.prompts import LoraUse, parse_prompt, without_extra_networks
from studio.a1111.schedulers import evaluations_per_step, make_scheduler
from studio.core.downloads import HubDownloads, offline_error
from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.jobs import MAX_SECONDS as MAX_GPU_SECONDS
from studio.core.jobs import JobControl, LocalJob, gpu_seconds
from studio.models.components import DiffusersModels
from studio.models.controlnets import ControlClock, ControlNetCatalog, controlnet_weights_file
from studio.models.families import family_of
from studio.models.loras import (
    AppliedLora,
    LoraCatalog,
    check_lora_uses,
    family_mismatch,
    layer_kinds,
    lora_key,
    made_for,
    model_made_for,
    vocabulary_of,
)
from studio.models.presets import ModelPreset, PresetCatalog
from studio.models.preview_decoders import preview_decoder_key, preview_decoder_of
from studio.models.stages import Conditioning, DiffusionStages, clip_skip_too_large
from studio.models.vocabulary import load_vocabulary, unknown_words_warning
from studio.tasks.control import (
    PlannedControl,
    check_control_units,
    control_call_arguments,
    controlnets_not_here,
    pass_controls,
    preprocessor_weights,
    preprocessors_not_here,
    with_model_hashes,
)
from studio.tasks.hires import (
    HiresPlan,
)
from studio.tasks.previews import (
    AUTO,
    FAST,
    TAESD,
    PreviewCosts,
    PreviewDecoders,
    CleanEstimate,
    preview_every_of,
    preview_maker,
    preview_step,
)
from studio.tasks.requests import (
    GeneratedImage,
    GenerationResult,
    MadeImage,
    ProgressCallback,
    RequestLimits,
    SamplingRequest,
    check_sampling,
    flow_parameters,
)
from studio.tasks.step_hooks import SoftBlend, inpaint_step_hooks, step_callback


@dataclass
class SamplingPlan:
    """A checked request made ready for the device: everything the GPU work needs and nothing else. It is
    picklable, so that it can cross into ZeroGPU's forked worker."""

    preset: ModelPreset
    task: str  # "text2img", "img2img" or "inpaint"
    prompt: str  # with the style applied
    negative_prompt: str
    scheduler: str
    steps: int
    guidance_scale: float
    seed: int  # resolved: image i of the batch uses seed + i
    batch_size: int
    size: tuple[int, int]  # what the model works at
    clip_skip: int = 1
    call_arguments: dict[str, Any] = field(default_factory=dict)  # task's own pipeline arguments (image, mask, strength)
    parameters_extra: dict[str, Any] = field(default_factory=dict)  # A1111 fields the task adds
    steps_per_image: int = 0  # denoising steps actually run per image (steps × strength for img2img)
    warnings: list[str] = field(default_factory=list)
    model_hash: str | None = None  # read with the model files, before the device work (hashing a file takes time)
    hires: HiresPlan | None = None  # text to image's second pass, at a larger size
    hires_upscaler_native_scale: int = 1  # of the hires upscaler preset (1 for latent modes and Lanczos)
    lora_uses: tuple[LoraUse, ...] = ()  # the prompt's <lora:...> tags
    loras: tuple[AppliedLora, ...] = ()  # ... resolved to files with the model files (the Hub's fetched first)
    controls: tuple[PlannedControl, ...] = ()  # ControlNet units, their maps made at `size`
    previews: bool = False  # live previews while someone watches the job (none: Off, or a public demo's checked preset)
    preview_every: int = AUTO  # every this many steps, or AUTO: as often as they cost <= 3% (studio.tasks.previews)
    preview_decoder: str | None = None  # the TAESD those previews are decoded with (a source; None: Fast)
    shift: float | None = None  # a flow-matching model's schedule shift (None: its own)
    distilled_guidance: float | None = None  # FLUX.1-dev's Distilled CFG Scale (None: the model takes none)
    soft: SoftBlend | None = None  # an inpaint's soft inpainting

    @property
    def encoder_prompt(self) -> str:
        """The prompt as the text encoder reads it: the extra-network tags taken out (the PNG keeps them)."""
        return without_extra_networks(self.prompt)

    @property
    def encoder_negative_prompt(self) -> str:
        return without_extra_networks(self.negative_prompt)

    def __post_init__(self):
        self.steps_per_image = self.steps_per_image or self.steps

    @property
    def steps_per_image_total(self) -> int:
        """Denoising steps of one image, both passes of Hires. fix counted."""
        return self.steps_per_image + (self.hires.steps_run if self.hires else 0)

    @property
    def total_steps(self) -> int:
        return self.steps_per_image_total * self.batch_size

    @property
    def gpu_seconds(self) -> int:
        """What to book on ZeroGPU for this job: the steps at the base size, Hires. fix's at its size (as many
        base-size steps as they cost by area), and its upscaler's passes."""
        # Heun, DPM2 and DPM++ SDE evaluate the UNet twice a step
        # a ControlNet is about the encoder half of its UNet: half an evaluation more per unit
        family = family_of(self.preset)
        per_step = (evaluations_per_step(self.scheduler, family.flow_matching)
                    * family.guidance_evaluations(self.guidance_scale) * (1 + 0.5 * len(self.controls)))
        evaluations = math.ceil(self.steps_per_image * per_step)
        pixels = self.size[0] * self.size[1]
        seconds = 0
        if self.hires:
            hires_pixels = self.hires.size[0] * self.hires.size[1]
            # its steps, and the VAE's encode and decode at its size (about two steps' worth)
            evaluations += math.ceil((self.hires.steps_run * per_step + 2) * hires_pixels / pixels)
            # an upscaler model's pass: about 1 s per 200 k output pixels (as the Upscale tab books it)
            if self.hires_upscaler_native_scale > 1:
                seconds = math.ceil(pixels * self.hires_upscaler_native_scale**2 / 200_000) * self.batch_size
        return min(MAX_GPU_SECONDS, gpu_seconds(self.preset, evaluations, self.batch_size, pixels) + seconds)


class SamplingEngine:
    """What text to image and inpainting share: presets and limits, validation, and the batch loop, run as
    stages on models leased from the shared ModelManager. Holds no per-request state."""

    main_task = "text2img"  # the pipeline task its requests run (whose model files must be here)

    def __init__(self, stages: DiffusionStages, presets: PresetCatalog, limits: RequestLimits, version: str,
                 downloads: HubDownloads | None = None, loras: LoraCatalog | None = None,
                 controlnets: ControlNetCatalog | None = None):
        self.stages = stages
        self.loras = loras or LoraCatalog({})
        self.controlnets = controlnets or ControlNetCatalog([])
        self.downloads = downloads or HubDownloads()
        self._detector_turn = threading.Lock()  # one learned preprocessor at a time (preprocessor_weights)
        self.preview_costs = PreviewCosts()  # what a live preview takes, which Auto plans with
        self.preview_decoders = PreviewDecoders(self.downloads)  # which preset's TAESD can be had here
        self.models: DiffusersModels = stages.models
        self.manager = stages.manager
        self.presets = presets
        self.limits = limits
        self.version = version
        # what each preset's model knows to draw, where its folder says so (the embedded family)
        self.vocabularies = {preset.name: load_vocabulary(preset.local) for preset in presets}

    def vocabulary_hint(self, preset_name: str) -> str:
        """What the preset's model knows, for the place where the user types ("" when it does not say)."""
        vocabulary = self.vocabularies.get(preset_name)
        return f"This model knows {vocabulary.summary()}." if vocabulary else ""

    def loras_that_fit(self, preset_name: str) -> list[str]:
        """The LoRAs on offer made for the preset's family (and those whose family is not known before a download),
        for the picker: the request's own check refuses the others with the reason."""
        if preset_name not in self.presets:
            return self.loras.names
        model = model_made_for(self.models, self.presets.get(preset_name))
        return [name for name in self.loras.names if self.loras.get(name).fits(model)]

    def unknown_words(self, preset_name: str, prompt: str, controls: tuple = ()) -> list[str]:
        """The prompt's words the preset's model never saw; a LoRA's own words, and those a ControlNet of
        `controls` (units) was trained with, count as known."""
        vocabulary = self.vocabularies.get(preset_name)
        if not vocabulary:
            return []
        taught = self._lora_vocabulary(prompt) | {word for unit in controls if unit.model in self.controlnets
                                                  for word in self.controlnets.get(unit.model).words}
        return [word for word in vocabulary.unknown_words(self._plain(prompt)) if word not in taught]

    def prompt_warnings(self, preset: ModelPreset, prompt: str, controls: tuple = ()) -> list[str]:
        """Notes on the prompt: the words the preset's model never saw (it ignores them; a LoRA's own words
        count as known, and a ControlNet unit's), and extra-network tags of kinds the studio does not run."""
        warnings = []
        unknown = self.unknown_words(preset.name, prompt, controls)
        if unknown:
            warnings.append(unknown_words_warning(self.vocabularies.get(preset.name), " ".join(unknown),
                                                  preset.label))
        ignored = self._parsed(prompt).ignored_tags
        if ignored:
            warnings.append(f"{', '.join(ignored)}: only <lora:…> add-ons run here; "
                            f"{'this tag was' if len(ignored) == 1 else 'these tags were'} left out.")
        return [warning for warning in warnings if warning]

    @staticmethod
    def _parsed(prompt: str):
        try:
            return parse_prompt(prompt)
        except InvalidRequest:  # a malformed tag: the request's check says so
            return parse_prompt("")

    def _plain(self, prompt: str) -> str:
        return self._parsed(prompt).plain

    def _lora_vocabulary(self, prompt: str) -> set[str]:
        """Words the prompt's local LoRAs say they teach."""
        words: set[str] = set()
        for use in self._parsed(prompt).loras:
            if use.name in self.loras and self.loras.get(use.name).repo is None:
                words.update(word.lower() for word in vocabulary_of(Path(self.loras.get(use.name).file)))
        return words

    def problems(self, request: SamplingRequest, task: str | None = None) -> dict[str, str]:
        """Problems with the request by field name, each a sentence a user can act on. Empty when it is fine.
        A model that cannot be had here is the one problem said (the sizes and steps it would take are moot)."""
        if request.preset not in self.presets:
            return {"preset": f"Unknown preset {request.preset!r}. Available presets: {', '.join(self.presets.names)}."}
        preset = self.presets.get(request.preset)
        unavailable = self.unavailable_model(preset, task or self.main_task)
        if unavailable is not None:
            return {"preset": unavailable.reason}
        problems = self.check(request, preset)
        problems |= family_of(preset).task_problems(preset, task or self.main_task, request.guidance_scale)
        if "prompt" not in problems:
            try:
                lora_problems = check_lora_uses(parse_prompt(self.prompt_as_run(request)).loras, self.loras,
                                                self.limits.max_loras)
            except InvalidRequest as error:
                lora_problems = error.problems
            if lora_problems:
                problems["prompt"] = " ".join(lora_problems)
        if isinstance(request.clip_skip, int) and request.clip_skip > 1 and "clip_skip" not in problems:
            layers = self.models.text_encoder_layers(preset)
            if layers is not None and request.clip_skip > layers:
                problems["clip_skip"] = clip_skip_too_large(request.clip_skip, layers)
        control_problems = self.control_problems(request, preset, task or self.main_task)
        if control_problems:
            problems["controls"] = " ".join(control_problems)
        return problems

    # ----- live previews -----

    def live_preview_plan(self, request: SamplingRequest, preset: ModelPreset) -> dict[str, Any]:
        """A plan's preview fields: every how many steps (0: none; none on a checked preset of a public demo, see
        preview_every_of), and the TAESD to decode them with: TAESD asks for the best preview there is, as
        ComfyUI's "auto": the preset's TAESD where it is here or can be fetched, else Fast ones (a preview is a
        courtesy: never a refusal, and no note on every image of a model that has none)."""
        every = preview_every_of(request, self.models.needs_safety_checker(preset),
                                 self.limits.previews_of_checked_presets)
        wanted = every is not None and request.live_preview == TAESD and self.preview_decoders.problem(preset) is None
        return dict(previews=every is not None, preview_every=AUTO if every is None else every,
                    preview_decoder=preview_decoder_of(preset) if wanted else None)

    def control_problems(self, request: SamplingRequest, preset: ModelPreset, task: str) -> list[str]:
        """What is wrong with the request's ControlNet units (a unit without an image uses the request's own image,
        where the task has one), and a ControlNet folder that is not here."""
        if not request.controls:
            return []
        problems = check_control_units(tuple(request.controls), preset, self.controlnets,
                                       self.limits.max_control_units, self.limits.max_upload_pixels,
                                       own_image=task != "text2img")
        if family_of(preset).controlnet_pipeline_classes.get(task) is None:
            problems.append(f"{family_of(preset).label} models take no ControlNet here.")
        problems += controlnets_not_here(tuple(request.controls), self.controlnets, preset.family, self.downloads,
                                         self.manager.dtype)
        problems += preprocessors_not_here(tuple(request.controls), self.controlnets, self.downloads)
        return list(dict.fromkeys(problems))

    @contextlib.contextmanager
    def preprocessor_weights(self, name: str) -> Iterator[Path | None]:
        """The folder with a learned preprocessor's files, fetched where allowed (WeightsFor, for units' maps),
        held while one map is made: one learned detector at a time per engine, since each holds a model and its
        activations in RAM (previews and plans run outside the GPU queue, several visitors at once)."""
        with preprocessor_weights(name, self.controlnets, self.downloads) as folder:
            if folder is None:
                yield None
                return
            with self._detector_turn:
                yield folder

    def check(self, request: SamplingRequest, preset: ModelPreset) -> dict[str, str]:
        return check_sampling(request, preset, self.limits)

    def prompt_as_run(self, request: SamplingRequest) -> str:
        """The prompt the job will encode (with its style's words, and any LoRA tags a style adds)."""
        return request.prompt

    def validate(self, request: SamplingRequest, task: str | None = None) -> ModelPreset:
        """The request's preset; raises ModelUnavailable (with the download command) for a model that cannot be
        had here, InvalidRequest for the rest."""
        if request.preset in self.presets:
            unavailable = self.unavailable_model(self.presets.get(request.preset), task or self.main_task)
            if unavailable is not None:
                raise unavailable
        problems = self.problems(request, task)
        if problems:
            raise InvalidRequest(list(problems.values()))
        return self.presets.get(request.preset)

    def unavailable_model(self, preset: ModelPreset, task: str | None = None) -> ModelUnavailable | None:
        """Why the preset's model files cannot be had for `task`, read without network: a checkpoint file missing
        or of another family, or files neither in the Hub cache nor downloadable (the Hub cannot be reached). None
        when they are here, or will be downloaded."""
        task = task or self.main_task
        try:
            self.models.check_checkpoint_files(preset, task)
            requests = self.models.download_requests(preset, task, self.manager.dtype)
        except ModelUnavailable as error:
            return error
        missing = [request for request in requests if not self.downloads.is_cached(request)]
        if missing and self.downloads.is_offline():
            return offline_error(missing)
        return None

    @contextlib.contextmanager
    def model_files(self, plan: SamplingPlan, on_progress: ProgressCallback | None = None) -> Iterator[SamplingPlan]:
        """The plan's model files, fetched from the Hub if they are not in the cache (its own step, before any
        device work and outside the device lock, so a download never holds up other visitors), and kept from the
        cache budget until the block ends; yields the plan resolved against them (the model's hash, the LoRAs as
        files), which is what runs. Raises ModelUnavailable on entering."""
        self.models.check_checkpoint_files(plan.preset, plan.task)
        requests = self.models.download_requests(plan.preset, plan.task, self.manager.dtype)
        requests += [request for control in plan.controls
                     if (request := control.preset.download_request(self.manager.dtype)) is not None]
        with contextlib.ExitStack() as protected:
            for request in requests:
                protected.enter_context(self.downloads.in_use(request.source))
            for request in requests:
                self.downloads.ensure(request, on_progress)
            # here, not in the device work: a checkpoint file's sha256 reads gigabytes (once per file), which must
            # not take GPU time (nor be lost with ZeroGPU's worker process)
            model_hash = self.models.model_hash(plan.preset, plan.task, on_progress)
            plan = self.with_controls(replace(plan, model_hash=model_hash), on_progress)
            plan = self.preview_decoders.fetched(plan, protected, on_progress)
            yield self.with_loras(plan, protected, on_progress)

    def with_controls(self, plan: SamplingPlan, on_progress: ProgressCallback | None = None) -> SamplingPlan:
        """The plan with its ControlNets' hashes in the PNG's fields, as A1111 writes them."""
        if not plan.controls:
            return plan
        hashes = []
        for control in plan.controls:  # A1111 writes the first 8 hex digits of the file's sha256
            path = controlnet_weights_file(control.preset, self.manager.dtype)
            hashes.append(self.models.file_hash(path, on_progress)[:8] if path is not None else None)
        controls = with_model_hashes(plan.controls, hashes)
        return replace(plan, controls=controls, parameters_extra=plan.parameters_extra | controlnet_parameters(
            [control.fields for control in controls]))

    def with_loras(self, plan: SamplingPlan, protected: contextlib.ExitStack,
                   on_progress: ProgressCallback | None = None) -> SamplingPlan:
        """The plan with the prompt's LoRAs as files (a Hub LoRA fetched now, before any device work), each
        checked against the preset's family, and the hashes the PNG records (A1111's "Lora hashes")."""
        applied = []
        model = model_made_for(self.models, plan.preset)
        for use in plan.lora_uses:
            preset = self.loras.get(use.name)
            if preset.repo is not None:
                protected.enter_context(self.downloads.in_use(preset.repo))
            path = self.loras.path(use.name, self.downloads, on_progress)
            mismatch = family_mismatch(use.name, made_for(path), model, plan.preset.label)
            if mismatch:
                raise InvalidRequest([mismatch])
            text_encoder_layers, denoiser_layers = layer_kinds(path)
            applied.append(AppliedLora(use.name, lora_key(path, family_of(plan.preset)), use.text_encoder_weight,
                                       use.unet_weight, self.loras.short_hash(path), text_encoder_layers,
                                       denoiser_layers))
        if not applied:
            return plan
        hashes = ", ".join(f"{hash_entry_name(lora.name)}: {lora.short_hash}" for lora in applied)
        return replace(plan, loras=tuple(applied), parameters_extra=plan.parameters_extra | {"Lora hashes": hashes})

    def run(self, plan: SamplingPlan, job: JobControl | None = None) -> GenerationResult:
        """The device work of a job: the prompt encoded once, then each image denoised, decoded and (where a
        safety checker runs) checked. Each image is one turn on the device (the manager grants turns in arrival
        order), so other jobs' images go in between; within it each stage holds the device lock and only its
        own models. Image i uses seed + i with a fresh scheduler: reproducible alone, bit for bit. A cancelled
        job ends the current image early and skips the rest."""
        job = job or LocalJob()
        result = GenerationResult(warnings=list(plan.warnings))
        conditioning = []

        def encoded() -> Conditioning:
            """The prompt's embeddings, encoded in the first image's turn and kept for the others."""
            if not conditioning:
                embeds, warnings = self.stages.encode(plan.preset, plan.task, plan.encoder_prompt,
                                                      plan.encoder_negative_prompt, plan.guidance_scale,
                                                      plan.clip_skip, plan.loras)
                result.warnings += warnings
                conditioning.append(embeds)
            return conditioning[0]

        postprocess = VaeImageProcessor()
        job.report(0, plan.total_steps, self._before_the_first_step(plan))
        for index in range(plan.batch_size):
            if job.cancelled:
                result.interrupted = True
                break
            image_seed = plan.seed + index
            made = self._one_image(plan, encoded, index, job)
            result.warnings += made.warnings
            if job.cancelled:
                result.interrupted = True
            if made.flagged:
                result.warnings.append(f"The safety checker flagged the image with seed {image_seed}; it is not "
                                       "shown.")
                continue
            image = postprocess.postprocess(made.pixels, output_type="pil")[0]
            # an image Stop cut short is decoded where it stopped, and says so in its parameters
            parameters = self.describe(plan, image_seed, made.parameters)
            image.info["parameters"] = parameters  # written as a PNG text chunk when saved as PNG
            result.images.append(GeneratedImage(image, image_seed, parameters, made.stopped_at, made.stopped_in_hires,
                                                made.latent_distance))
        job.report(plan.total_steps, plan.total_steps, "Done")
        result.warnings = list(dict.fromkeys(result.warnings))  # said once, not once per image
        return result

    def _one_image(self, plan: SamplingPlan, encoded: Callable[[], Conditioning], index: int,
                   job: JobControl) -> MadeImage:
        """Image `index` of the plan in one turn on the device: denoised, decoded and checked."""
        with self.manager.turn(owner=job.owner):
            found = {}  # what the pass leaves besides its latents (soft inpainting's distance from the original)
            latents, steps_done = self._denoise(plan, encoded(), index, job, found=found)
            made = self._finish_image(plan, plan.task, latents, plan.size, steps_done, plan.steps_per_image)
            made.latent_distance = found.get("latent_distance")
            return made

    def _denoise(self, plan: SamplingPlan, conditioning: Conditioning, index: int, job: JobControl,
                 second_pass: SecondPass | None = None, found: dict | None = None) -> tuple[torch.Tensor, int]:
        """One denoising pass of image `index`: (latents, steps done). The plan's own pass, or Hires. fix's
        second pass."""
        preset = plan.preset
        task, size, arguments = plan.task, plan.size, plan.call_arguments
        schedule, pass_steps = plan.steps, plan.steps_per_image
        start, label = index * plan.steps_per_image_total, self._image_label(plan, index)
        if second_pass is not None:
            task, size, arguments = "img2img", second_pass.size, second_pass.call_arguments
            schedule, pass_steps = second_pass.schedule_steps, second_pass.steps
            start, label = second_pass.start, f"{label}, hires. fix"
        image_seed = plan.seed + index
        steps_done = [0]
        on_step = step_callback(job, steps_done, pass_steps, start, plan.total_steps, label)
        controls = pass_controls(plan.controls, size, hires=second_pass is not None)

        previews = plan.previews and job.wants_previews
        decoder = preview_decoder_key(plan.preview_decoder) if previews and plan.preview_decoder else None

        family = family_of(preset)

        def call(pipe, preview_decoder=None):
            pipe.scheduler = make_scheduler(plan.scheduler, pipe.scheduler.config, preset.scheduler_overrides,
                                           seed=image_seed, flow=family.flow_matching, shift=plan.shift)
            each_step, control_arguments = on_step, {}
            if controls is not None:  # the units' clock: which step each evaluation is at, for their ranges
                clock = pipe.controlnet.clock = ControlClock(pass_steps, getattr(pipe.scheduler, "order", 1))
                each_step = clock.ticking(on_step)
                control_arguments = control_call_arguments(family.control_image_argument(task), controls)
            if previews:
                make = preview_maker(family, preview_decoder)
                each_step = preview_step(job, lambda latents: make(family.preview_latents(latents, *size,
                                                                                          pipe.vae_scale_factor)),
                                         CleanEstimate(pipe.scheduler), plan.preview_every, pass_steps, then=each_step,
                                         costs=self.preview_costs,
                                         way=plan.preview_decoder if preview_decoder is not None else FAST)
            step_hooks = {"callback_on_step_end": each_step}
            if task == "inpaint":
                step_hooks = inpaint_step_hooks(pipe, family, arguments["image"], image_seed, then=each_step,
                                                soft=plan.soft, found=found)
            latents = pipe(
                **family.call_arguments(pipe, conditioning.embeds, plan.guidance_scale, plan.distilled_guidance),
                **(family.size_arguments(task, *size) | arguments | step_hooks), **control_arguments,
                num_inference_steps=schedule, generator=torch.Generator("cpu").manual_seed(image_seed),
                output_type="latent",
            ).images
            return family.spatial_latents(pipe, latents, *size)

        denoise = functools.partial(self.stages.denoise, preset, task, size[0], size[1], plan.guidance_scale > 1,
                                    call, plan.loras, controls)
        try:
            latents = denoise(decoder)
        except ModelUnavailable:
            if decoder is None:
                raise
            # a TAESD that cannot be loaded (a broken folder) costs the image nothing: Fast previews, from now on
            self.preview_decoders.failed_to_load(plan.preview_decoder, preset)
            latents = denoise(None)
        return latents, steps_done[0]

    def _finish_image(self, plan: SamplingPlan, task: str, latents: torch.Tensor, size: tuple[int, int],
                      steps_done: int, steps: int, parameters: dict | None = None,
                      in_hires: bool = False) -> MadeImage:
        """Decode and check latents of `steps` steps of which `steps_done` ran (in the caller's turn)."""
        pixels = self.stages.decode(plan.preset, task, latents, size[0], size[1])
        stopped_at = steps_done if steps_done < steps else None
        fields = dict(parameters or {})
        if stopped_at:
            fields["Stopped at hires step" if in_hires else "Stopped at step"] = stopped_at
        flagged = self.stages.check(plan.preset, task, pixels)[0]
        return MadeImage(pixels, flagged, stopped_at, in_hires and stopped_at is not None, fields)

    @staticmethod
    def _image_label(plan: SamplingPlan, index: int) -> str:
        return f"Image {index + 1}/{plan.batch_size}"

    def _before_the_first_step(self, plan: SamplingPlan) -> str:
        """What the job waits for until its first denoising step: the model loaded (the first time), or only
        the prompt encoded."""
        keys = self.models.keys(plan.preset, plan.task).values()
        if all(self.manager.is_loaded(key) for key in keys):
            return "Encoding the prompt"
        return f"Loading {plan.preset.label} and encoding the prompt"

    def describe(self, plan: SamplingPlan, seed: int, extra: dict | None = None) -> str:
        """A1111's parameters text for image `seed` of the plan (and `extra` fields of this image's own)."""
        return format_parameters(
            plan.prompt, plan.negative_prompt, steps=plan.steps, scheduler=plan.scheduler,
            guidance_scale=plan.guidance_scale, seed=seed, width=plan.size[0], height=plan.size[1],
            model=model_name(plan.preset, plan.task), model_hash=plan.model_hash, version=self.version,
            flow=family_of(plan.preset).flow_matching,
            extra={**({"Clip skip": plan.clip_skip} if plan.clip_skip > 1 else {}), **flow_parameters(plan),
                   **plan.parameters_extra, **(extra or {})} or None,
        )


@dataclass
class SecondPass:
    """What Hires. fix's second pass of one image runs: image to image on `call_arguments` (the upscaled image or
    latents, and diffusers' strength), the last `steps` of a `schedule_steps` schedule, at `size`."""

    size: tuple[int, int]
    call_arguments: dict
    schedule_steps: int
    steps: int
    start: int  # the job's steps done before it


class PhaseOfJob(JobControl):
    """A part of a job that counts its own progress (an upscaler's passes and tiles): shown as the job's text
    while its bar stays at `done` of `total`; cancelled when the job is."""

    def __init__(self, job: JobControl, done: int, total: int, label: str):
        self.job, self.done, self.total, self.label = job, done, total, label

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def report(self, done: int, total: int, text: str) -> None:
        self.job.report(self.done, self.total, f"{self.label}: {text}")

    @property
    def owner(self) -> object:
        return self.job.owner


def hash_entry_name(name: str) -> str:
    """A LoRA's name as A1111 writes it in "Lora hashes": without the ':' and ',' that separate the entries."""
    return name.replace(":", "").replace(",", "")


def model_name(preset: ModelPreset, task: str) -> str:
    """The PNG's Model: A1111 writes the stem of the checkpoint file that ran; a repo or folder preset its name."""
    if task == "inpaint" and preset.inpaint_checkpoint is not None:
        return preset.inpaint_checkpoint.stem
    return preset.checkpoint.stem if preset.checkpoint is not None else preset.name


def model_names(preset: ModelPreset) -> set[str]:
    """The names a PNG's Model field may give this preset by (plain-spelled)."""
    names = {preset.name, model_name(preset, "text2img"), model_name(preset, "inpaint")}
    return {plain_model_name(name) for name in names}


def plain_model_name(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")

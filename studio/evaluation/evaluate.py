"""Evaluate presets on a prompt list: every prompt × seed for each preset, the images, a CSV of per-image scores and
a Markdown report (CLIP score with a 95% bootstrap interval, FID against a reference folder, the oracle's accuracy
for the embedded model).

    python -m studio.evaluation --presets embedded,stable-diffusion-1.5 --prompts prompts.txt --seeds 4 --out runs/eval
    accelerate launch --num_processes 4 -m studio.evaluation ...         # 4 GPUs
    torchrun --standalone --nproc_per_node 2 -m studio.evaluation ...     # 2 CPU processes

It scales out on accelerate: each preset's images are shared out between the processes with
`PartialState().split_between_processes` (so a slow preset keeps every process busy), each process writes and
scores its own images, and the main process gathers the rows and writes the CSV and the report. Seeds belong to
prompts, not processes, and every image and feature is computed alone (batch 1), so N processes write the same
files as one, bit for bit, on the same kind of device (tested on the CPU). On the CPU each process computes with one
thread unless OMP_NUM_THREADS says otherwise (as torchrun sets it): a CPU kernel's sums depend on its thread count
(one pixel level in one image of nine, measured), so more cores are used by more processes.

Every input is checked, and every task planned, on every process before any image is made; an error in one process
is reported by all of them at the next gathering, so none is left waiting. This is a command-line composition root,
like app.py: it builds its own ModelManager on its process's device.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import os
import socket
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import stats

from studio.a1111.metadata import save_png
from studio.a1111.prompts import plain_text
from studio.core.devices import default_device_budget, default_ram_budget, free_device_bytes, parse_bytes
from studio.core.downloads import HubDownloads
from studio.core.errors import InvalidRequest, ModelUnavailable, StudioError
from studio.core.memory import ModelManager
from studio.evaluation.metrics import (
    EMBEDDED_CLIP,
    FID_EXTRACTORS,
    REAL_CLIP,
    ClipScorer,
    ImageFeatures,
    InceptionFeatures,
    embedded_clip_scorer,
    fid_extractor,
    frechet_distance,
    image_files,
    open_image,
    real_clip_scorer,
)
from studio.evaluation.model_kinds import CLIP, INCEPTION, ClipLoader, InceptionLoader
from studio.models.loading import HubAccess
from studio.models.loras import LoraCatalog
from studio.models.presets import PRESETS_DIR, PresetCatalog, load_presets
from studio.tasks.engines import ManagerSettings, build_engines, build_manager
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.requests import MAX_SEED
from studio.tasks.sampling import SamplingPlan

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # the interval is part of the report, which must be the same file on every run
# How long a process may wait for the others at a gathering (torch's default is 10 minutes under NCCL, shorter
# than one process's share of a large preset).
GATHER_TIMEOUT = timedelta(hours=12)
CSV_FIELDS = ("preset", "prompt_index", "seed", "prompt", "image", "clip_score", "oracle", "oracle_misses")


@dataclass(frozen=True)
class Task:
    """One image to make: a preset, a prompt (by its line in the file) and a seed."""

    preset: str
    prompt_index: int
    prompt: str
    seed: int

    @property
    def image(self) -> str:
        return f"images/{self.preset}/{self.prompt_index:04d}-{self.seed}.png"


@dataclass
class Row:
    task: Task
    clip_score: float
    oracle: dict[str, bool] | None  # None: the oracle cannot judge this preset or prompt
    features: torch.Tensor | None  # the image's FID features, (1, D); None without a reference folder

    def csv_fields(self) -> list:
        oracle = "" if self.oracle is None else int(all(self.oracle.values()))
        misses = "" if self.oracle is None else " ".join(name for name, ok in self.oracle.items() if not ok)
        return [self.task.preset, self.task.prompt_index, self.task.seed, self.task.prompt, self.task.image,
                f"{self.clip_score:.4f}", oracle, misses]


def is_first_process() -> bool:
    """Before the process group starts: only the first process speaks, so an error is said once, not N times."""
    return os.environ.get("RANK", "0") == "0"


def input_error(message: str) -> SystemExit:
    """Bad input on the command line: said on stderr, exit status 2 (as argparse does)."""
    if is_first_process():
        print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        if is_first_process():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    if not path.is_file():
        raise input_error(f"the prompts file {path} does not exist (one prompt per line).")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
    except UnicodeDecodeError as error:
        raise input_error(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    except OSError as error:
        raise input_error(f"{path} could not be read ({error.strerror}).") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise input_error(f"{path} has no prompts (one per line; lines starting with # are skipped).")
    return prompts


def all_tasks(presets: Sequence[str], prompts: Sequence[str], seeds: int, first_seed: int) -> list[Task]:
    """Every image, in the order of the CSV: by preset, then prompt, then seed (the same seeds for every prompt)."""
    return [Task(preset, index, prompt, first_seed + k)
            for preset in presets for index, prompt in enumerate(prompts) for k in range(seeds)]


def bootstrap_interval(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean (scipy's), the same on every run; a single value is its
    own interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap((values,), np.mean, n_resamples=samples, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


class Evaluator:
    """Makes and scores the images of a list of tasks on one process's device."""

    def __init__(self, text_to_image: TextToImage, clip: ClipScorer, features: ImageFeatures | None, out: Path):
        self.text_to_image = text_to_image
        self.clip = clip
        self.features = features
        self.out = out

    def request(self, task: Task) -> TextToImageRequest:
        """The preset's own defaults, one image."""
        return TextToImageRequest.preset_defaults(self.text_to_image.presets.get(task.preset), task.prompt, task.seed)

    def plans(self, tasks: Sequence[Task]) -> dict[Task, SamplingPlan]:
        """Every task checked and planned (raises InvalidRequest naming the prompt)."""
        plans = {}
        for task in tasks:
            try:
                plans[task] = self.text_to_image.plan(self.request(task))
            except InvalidRequest as error:
                raise InvalidRequest([f"{task.preset}, prompt {task.prompt_index + 1}: {problem}"
                                      for problem in error.problems]) from None
        return plans

    def fetch_models(self, plans: dict[Task, SamplingPlan]) -> None:
        """Every preset's files there (fetched now if the Hub can be reached), before any image is made: a preset
        that cannot load stops the run before the others' images, with its own message."""
        first_plans = {}
        for task, plan in plans.items():
            first_plans.setdefault(task.preset, plan)
        for plan in first_plans.values():
            with self.text_to_image.model_files(plan):
                pass

    def run(self, tasks: Sequence[Task], plans: dict[Task, SamplingPlan], log=print) -> list[Row]:
        from studio.embedded.oracle import check_prompt

        rows = []
        for preset in dict.fromkeys(task.preset for task in tasks):  # one model load per preset
            group = [task for task in tasks if task.preset == preset]
            judged = self.text_to_image.presets.get(preset).oracle
            with self.text_to_image.model_files(plans[group[0]]) as first:
                for task in group:
                    plan = replace(plans[task], model_hash=first.model_hash)
                    with contextlib.ExitStack() as protected:  # the task's own LoRAs, kept while it runs
                        made = self.text_to_image.run(self.text_to_image.with_loras(plan, protected)).images[0]
                    path = self.out / task.image
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_png(made.image, path, made.parameters)
                    words = plain_text(task.prompt)  # without weights, BREAKs or LoRA tags
                    rows.append(Row(task, self.clip.scores([made.image], [words])[0],
                                    check_prompt(made.image, words) if judged else None,
                                    self.features.features([made.image]) if self.features else None))
                    log(f"{len(rows)}/{len(tasks)} {task.image}")
        return rows


def write_csv(rows: Sequence[Row], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerows(row.csv_fields() for row in rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def preset_summary(rows: Sequence[Row], reference: torch.Tensor | None) -> dict:
    scores = [row.clip_score for row in rows]
    summary = {"images": len(rows), "clip_mean": float(np.mean(scores)), "clip_interval": bootstrap_interval(scores)}
    if reference is not None:
        summary["fid"] = frechet_distance(reference, torch.cat([row.features for row in rows]))
    judged = [row for row in rows if row.oracle is not None]
    if judged:
        summary["oracle"] = (sum(all(row.oracle.values()) for row in judged), len(judged))
    return summary


def report(rows: Sequence[Row], args: argparse.Namespace, text_to_image: TextToImage, clip_label: str,
           features_label: str | None, reference: torch.Tensor | None, prompt_count: int) -> str:
    """The Markdown report: what was run, then a table per preset."""
    lines = ["# Evaluation", "",
             f"{prompt_count} prompts from `{args.prompts.name}` × {args.seeds} seeds "
             f"({args.seed}–{args.seed + args.seeds - 1}, the same for every prompt) for each preset, at the preset's "
             f"own defaults. {text_to_image.version}.", "",
             f"- CLIP score: {clip_label} (100 × cosine, floored at 0, as torchmetrics defines it); scores from "
             "different CLIP models do not compare. The interval is a 95% percentile bootstrap of the mean "
             f"({BOOTSTRAP_SAMPLES} resamples)."]
    if reference is not None:
        lines.append(f"- FID against `{args.reference}` ({len(reference)} images), features: {features_label}. FIDs "
                     "from different feature extractors do not compare; with few images FID is biased upwards, so "
                     "compare only presets with the same number of images.")
    else:
        lines.append("- FID: no reference folder given (`--reference DIR`).")
    lines.append("- Oracle accuracy (the embedded model's shapes): the share of images in which the oracle reads "
                 "everything the prompt names (shape, colour, background, and position and size where named); "
                 "prompts it cannot read (no shape word, or several) are left out.")
    for preset in args.presets:
        preset_rows = [row for row in rows if row.task.preset == preset]
        summary = preset_summary(preset_rows, reference)
        settings = text_to_image.presets.get(preset)
        low, high = summary["clip_interval"]
        lines += ["", f"## {preset}", "",
                  f"{settings.label}: {settings.default_scheduler}, {settings.default_steps} steps, CFG "
                  f"{settings.default_guidance:g}, {settings.default_width}×{settings.default_height}.", "",
                  "| metric | value |", "|---|---|",
                  f"| images | {summary['images']} |",
                  f"| CLIP score (95% CI) | {summary['clip_mean']:.2f} ({low:.2f}–{high:.2f}) |"]
        if "fid" in summary:
            lines.append(f"| FID vs reference | {summary['fid']:.2f} |")
        if "oracle" in summary:
            right, judged = summary["oracle"]
            lines.append(f"| oracle accuracy | {100 * right / judged:.1f}% ({right}/{judged}) |")
        elif settings.oracle:
            lines.append("| oracle accuracy | not measured: no prompt the oracle can read |")
        else:
            lines.append("| oracle accuracy | not measured: the oracle reads the embedded model's shapes only |")
    return "\n".join(lines) + "\n"


def byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def preset_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one preset, e.g. --presets embedded")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} named twice")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m studio.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", required=True, type=preset_names,
                        help="comma-separated preset names, e.g. embedded,stable-diffusion-1.5")
    parser.add_argument("--prompts", required=True, type=Path, help="a text file, one prompt per line")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt and preset (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="where images/, scores.csv and report.md go")
    parser.add_argument("--reference", type=Path, help="a folder of real images to compute FID against")
    parser.add_argument("--fid-features", choices=FID_EXTRACTORS, default="auto",
                        help="FID's feature extractor: Inception where its weights are on disk, else the CLIP's "
                        "image encoder (default %(default)s)")
    parser.add_argument("--presets-file", type=Path, default=PRESETS_DIR / "models.yaml")
    parser.add_argument("--device-budget", type=byte_count, help="bytes of weights + working memory on each process's device, e.g. "
                        "6GiB (default: 90%% of free VRAM; on the CPU 60%% of available RAM shared by the processes)")
    args = parser.parse_args(argv)
    if args.reference is not None and not args.reference.is_dir():
        parser.error(f"--reference {args.reference} is not a folder of images")
    if not args.presets_file.is_file():
        parser.error(f"--presets-file {args.presets_file} does not exist")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not 0 <= args.seed <= MAX_SEED - args.seeds + 1:
        parser.error(f"--seed must be between 0 and {MAX_SEED - args.seeds + 1} (the seeds are --seed to "
                     f"--seed + {args.seeds - 1}, and the largest seed is {MAX_SEED})")
    return args


def local_processes() -> int:
    """How many processes share this machine (torchrun and accelerate say so)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def read_presets(args: argparse.Namespace) -> PresetCatalog:
    try:
        return load_presets(args.presets_file)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise InvalidRequest([f"{args.presets_file} could not be read: {error}"]) from None


def build_engine(args: argparse.Namespace, device: torch.device) -> TextToImage:
    presets = read_presets(args)
    unknown = [name for name in args.presets if name not in presets]
    if unknown:
        raise InvalidRequest([f"Unknown preset(s) {', '.join(unknown)}. Available: {', '.join(presets.names)}."])
    presets = PresetCatalog([presets.get(name) for name in args.presets], args.presets[0])
    sharing = 1 if device.type != "cpu" else local_processes()  # on the CPU the processes share one RAM
    manager, models = build_manager(presets, ManagerSettings(
        device=device, device_budget=args.device_budget or default_device_budget(device) // sharing,
        ram_budget=default_ram_budget() // local_processes(), free_memory=functools.partial(free_device_bytes, device),
        extra_loaders={CLIP: ClipLoader(), INCEPTION: InceptionLoader()}))
    return build_engines(manager, models, presets, loras=LoraCatalog({}),
                         downloads=HubDownloads(offline=HubAccess().offline)).text_to_image


def chosen_models(args: argparse.Namespace, manager: ModelManager) -> tuple[str, str | None]:
    """The CLIP (its label) and the FID extractor ("inception", "clip" or None without a reference) this machine
    would use. The main process's choice is the run's: every process must score with the same models."""
    clip = real_clip_scorer(manager) or embedded_clip_scorer(manager, EMBEDDED_CLIP)
    if args.reference is None:
        return clip.label, None
    extractor = fid_extractor(args.fid_features, manager, clip)
    return clip.label, "inception" if isinstance(extractor, InceptionFeatures) else "clip"


def scorers(manager: ModelManager, clip_label: str, features: str | None) -> tuple[ClipScorer, ImageFeatures | None]:
    """The run's CLIP and FID extractor on this process (ModelUnavailable where this machine lacks them)."""
    if clip_label == REAL_CLIP:
        clip = real_clip_scorer(manager)
        if clip is None:
            raise ModelUnavailable(f"{REAL_CLIP}, which the main process scores with, is not in this machine's Hub "
                                   "cache: put it there on every machine, or remove it from the main one's.")
    else:
        clip = embedded_clip_scorer(manager, EMBEDDED_CLIP)
    return clip, (fid_extractor(features, manager, clip) if features else None)


def first_error(error: str | None) -> str | None:
    """Every process's error (or None) gathered: the first, for all of them to report and stop on."""
    from accelerate.utils import gather_object

    return next((found for found in gather_object([error]) if found), None)


def attempt(action, where: str):
    """(result, None), or (None, the error's message): every failure, a fault too, must reach the next gathering,
    where every process stops on it; a process that raised past it would leave the others waiting there."""
    try:
        return action(), None
    except StudioError as problem:
        return None, f"{where}{problem}"
    except Exception as problem:  # noqa: BLE001 - a fault: its traceback here, its message for every process
        traceback.print_exc()
        return None, f"{where}{type(problem).__name__}: {problem}"


def inputs_fingerprint(args: argparse.Namespace, prompts: Sequence[str], references: Sequence[Path]) -> str:
    """What every process must agree on (on several machines each reads its own copy of the files)."""
    catalog = read_presets(args)
    presets = {name: {key: value for key, value in dataclasses.asdict(catalog.get(name)).items()
                      if not isinstance(value, Path)}  # folders may lie elsewhere on another machine
               for name in args.presets if name in catalog}
    facts = [list(prompts), presets, args.seeds, args.seed, args.fid_features,
             [(path.name, path.stat().st_size) for path in references]]
    return hashlib.sha256(repr(facts).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    status = evaluate(argv)
    # every process leaves together once all went well (exiting with the group still up aborts the others' gloo
    # threads); after an exception a process just exits, and the launcher stops the others
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return status


def evaluate(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    args = parse_args(argv)
    prompts = read_prompts(args.prompts)
    if args.reference is not None and len(prompts) * args.seeds < 2:
        raise input_error("FID needs at least 2 images per preset: give more prompts or --seeds.")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no use for inference, and it costs time
    world = int(os.environ.get("WORLD_SIZE", 1))
    single_device = torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    # cpu=True where there is no CUDA for several processes (accelerate has no multi-process MPS): without it
    # accelerate ignores torchrun's ranks, and every process would make every image
    state = PartialState(cpu=not torch.cuda.is_available() and (world > 1 or not single_device),
                         timeout=GATHER_TIMEOUT)
    if state.num_processes != world:
        raise input_error(f"{world} processes were started, but accelerate sees {state.num_processes}.")
    if state.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the same sums in every process however many there are (see above)
    say = (lambda text: print(text, file=sys.stderr)) if state.is_main_process else (lambda text: None)
    where = f"[process {state.process_index + 1}/{state.num_processes} on {socket.gethostname()}] " \
        if state.num_processes > 1 else ""
    log = (lambda text: print(where + text, file=sys.stderr, flush=True))

    def stop_on_error(error: str | None) -> bool:
        error = first_error(error)
        if error:
            say(f"error: {error}")
        return bool(error)

    # 1. the same inputs everywhere, the engine built, the main process's choice of CLIP and FID extractor
    references = image_files(args.reference) if args.reference else []
    fingerprint, error = attempt(lambda: inputs_fingerprint(args, prompts, references), where)
    if stop_on_error(error):
        return 2
    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) > 1:
        say("error: the processes were given different inputs: the prompts file, the presets or the reference "
            "folder differ between machines. Give every machine the same files.")
        return 2
    text_to_image, error = attempt(lambda: build_engine(args, state.device), where)
    choice = [None]
    if error is None and state.is_main_process:
        choice[0], error = attempt(lambda: chosen_models(args, text_to_image.manager), where)
    if stop_on_error(error):
        return 2
    broadcast_object_list(choice)
    clip_label, features_kind = choice[0]
    tasks = all_tasks(args.presets, prompts, args.seeds, args.seed)

    # 2. scorers, every task planned, every preset's files found, the reference's features: before any image
    def prepare():
        clip, features = scorers(text_to_image.manager, clip_label, features_kind)
        evaluator = Evaluator(text_to_image, clip, features, args.out)
        plans = evaluator.plans(tasks)
        evaluator.fetch_models(plans)
        if args.reference is not None and len(references) < 2:
            raise InvalidRequest([f"FID needs at least 2 reference images; {args.reference} has {len(references)}."])
        with state.split_between_processes(references) as mine:
            reference_rows = [features.features([open_image(path)]) for path in mine]
        return evaluator, plans, reference_rows

    prepared, error = attempt(prepare, where)
    if stop_on_error(error):
        return 2
    evaluator, plans, reference_rows = prepared

    # 3. the images: each preset's shared out between all processes; an error stops everyone after that preset
    rows = []
    for preset in args.presets:
        with state.split_between_processes([task for task in tasks if task.preset == preset]) as mine:
            made, error = attempt(lambda: evaluator.run(mine, plans, log=log), where)
        if stop_on_error(error):
            return 2
        rows += made

    # 4. gathered on the main process (the device emptied first: gathering stages the rows on it under NCCL)
    text_to_image.manager.offload_idle()
    gathered = gather_object([(rows, reference_rows)])
    if state.is_main_process:
        order = {task: index for index, task in enumerate(tasks)}
        rows = sorted((row for part, _ in gathered for row in part), key=lambda row: order[row.task])
        reference = torch.cat([row for _, part in gathered for row in part]) if references else None
        write_csv(rows, args.out / "scores.csv")
        text, error = attempt(lambda: report(rows, args, text_to_image, evaluator.clip.label,
                                             evaluator.features.label if evaluator.features else None, reference,
                                             len(prompts)), where)
        if error:
            say(f"error: {error} (scores.csv is written)")
            return 2
        (args.out / "report.md").write_text(text, encoding="utf-8")
        print(f"Wrote {len(rows)} images, {args.out / 'scores.csv'} and {args.out / 'report.md'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate presets on a prompt list: every prompt × seed for each preset, the images, a CSV of per-image scores and
a Markdown report (CLIP score with a 95% bootstrap interval, FID against a reference folder, the oracle's accuracy
for the embedded model).

    python -m studio.evaluate --presets embedded,stable-diffusion-1.5 --prompts prompts.txt --seeds 4 --out runs/eval
    accelerate launch --num_processes 4 -m studio.evaluate ...         # 4 GPUs
    torchrun --nproc_per_node 2 -m studio.evaluate ...                  # 2 CPU processes

It scales out on accelerate: the (preset, prompt, seed) images are split between processes with
`PartialState().split_between_processes`, each process writes its own images and scores them, and the main process
gathers the rows and writes the CSV and the report. Seeds belong to prompts, not processes, and every image and
feature is computed alone (batch 1), so N processes write the same files as one, bit for bit, on the same kind of
device. On the CPU each process computes with one thread unless OMP_NUM_THREADS says otherwise (as torchrun sets
it): a CPU kernel's sums depend on its thread count (one pixel level in one image of nine, measured), so more cores
are used by more processes.

This is a command-line composition root, like app.py: it builds its own ModelManager on its process's device.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .devices import default_device_budget, default_dtype, default_ram_budget
from .downloads import HubDownloads
from .errors import StudioError
from .generation import RequestLimits, TextToImage, TextToImageRequest
from .memory import ModelManager
from .metadata import save_png
from .metrics import FID_EXTRACTORS, ClipScorer, ImageFeatures, default_clip_scorer, fid_extractor, folder_images, frechet_distance
from .model_kinds import CLIP, INCEPTION, ClipLoader, InceptionLoader
from .pipelines import DiffusersModels, DiffusionStages, HubAccess, diffusers_loaders
from .presets import PRESETS_DIR, PresetCatalog, load_presets, load_styles

EMBEDDED_CLIP = Path(__file__).resolve().parent.parent / "models" / "embedded-clip"
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # the interval is part of the report, which must be the same file on every run
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
    features: torch.Tensor = field(repr=False)  # the image's FID features, (1, D)

    def csv_fields(self) -> list:
        oracle = "" if self.oracle is None else int(all(self.oracle.values()))
        misses = "" if self.oracle is None else " ".join(name for name, ok in self.oracle.items() if not ok)
        return [self.task.preset, self.task.prompt_index, self.task.seed, self.task.prompt, self.task.image,
                f"{self.clip_score:.4f}", oracle, misses]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    if not path.is_file():
        raise SystemExit(f"error: the prompts file {path} does not exist (one prompt per line).")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise SystemExit(f"error: {path} has no prompts (one per line; lines starting with # are skipped).")
    return prompts


def all_tasks(presets: Sequence[str], prompts: Sequence[str], seeds: int, first_seed: int) -> list[Task]:
    """Every image, in the order of the CSV: by preset, then prompt, then seed (the same seeds for every prompt)."""
    return [Task(preset, index, prompt, first_seed + k)
            for preset in presets for index, prompt in enumerate(prompts) for k in range(seeds)]


def bootstrap_interval(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


class Evaluator:
    """Makes and scores the images of a list of tasks on one process's device."""

    def __init__(self, text_to_image: TextToImage, clip: ClipScorer, features: ImageFeatures, out: Path):
        self.text_to_image = text_to_image
        self.clip = clip
        self.features = features
        self.out = out

    def request(self, task: Task) -> TextToImageRequest:
        """The preset's own defaults, one image."""
        preset = self.text_to_image.presets.get(task.preset)
        return TextToImageRequest(prompt=task.prompt, preset=preset.name, scheduler=preset.default_scheduler,
                                  steps=preset.default_steps, guidance_scale=preset.default_guidance,
                                  width=preset.default_width, height=preset.default_height, seed=task.seed)

    def judged_by_oracle(self, preset_name: str) -> bool:
        """The oracle reads the embedded family's drawn shapes: presets whose folder carries its vocabulary."""
        return self.text_to_image.vocabularies.get(preset_name) is not None

    def run(self, tasks: Sequence[Task], log=print) -> list[Row]:
        from .embedded.oracle import check_prompt

        rows = []
        for preset in dict.fromkeys(task.preset for task in tasks):  # one model load per preset
            group = [task for task in tasks if task.preset == preset]
            plans = [self.text_to_image.plan(self.request(task)) for task in group]
            with self.text_to_image.model_files(plans[0]):
                for task, plan in zip(group, plans):
                    plan.model_hash = plans[0].model_hash
                    made = self.text_to_image.run(plan).images[0]
                    path = self.out / task.image
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_png(made.image, path, made.parameters)
                    oracle = check_prompt(made.image, task.prompt) if self.judged_by_oracle(preset) else None
                    rows.append(Row(task, self.clip.scores([made.image], [task.prompt])[0], oracle,
                                    self.features.features([made.image])))
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
           features_label: str, reference: torch.Tensor | None, prompt_count: int) -> str:
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
    lines.append("- Oracle accuracy (embedded model only): the share of images in which the oracle reads everything "
                 "the prompt names (shape, colour, background, and position and size where named).")
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
        else:
            lines.append("| oracle accuracy | not measured (not the embedded model) |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m studio.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", required=True, type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
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
    parser.add_argument("--device-budget", type=int, help="bytes of weights + working memory on the device")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[TextToImage, ClipScorer, ImageFeatures]:
    presets = load_presets(args.presets_file)
    unknown = [name for name in args.presets if name not in presets]
    if unknown:
        raise SystemExit(f"error: unknown preset(s) {', '.join(unknown)}. Available: {', '.join(presets.names)}.")
    presets = PresetCatalog([presets.get(name) for name in args.presets], args.presets[0])
    models = DiffusersModels(device)
    manager = ModelManager(
        {**diffusers_loaders(models.variant_for(presets)), CLIP: ClipLoader(), INCEPTION: InceptionLoader()},
        device, default_dtype(device), device_budget=args.device_budget or default_device_budget(device),
        ram_budget=default_ram_budget())
    text_to_image = TextToImage(DiffusionStages(manager, models), presets, load_styles(), RequestLimits(),
                                version=f"Diffusion Studio {__version__}",
                                downloads=HubDownloads(offline=HubAccess().offline))
    clip = default_clip_scorer(manager, EMBEDDED_CLIP)
    return text_to_image, clip, fid_extractor(args.fid_features, manager, clip)


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    args = parse_args(argv)
    prompts = read_prompts(args.prompts)
    # cpu=True where there is no GPU: without it accelerate ignores torchrun's ranks on a CPU machine
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the same sums in every process however many there are (see above)
    try:
        text_to_image, clip, features = build(args, state.device)
        tasks = all_tasks(args.presets, prompts, args.seeds, args.seed)
        reference_images = folder_images(args.reference) if args.reference else []
        if args.reference and len(reference_images) < 2:
            raise SystemExit(f"error: FID needs at least 2 reference images; {args.reference} has "
                             f"{len(reference_images)}.")
        evaluator = Evaluator(text_to_image, clip, features, args.out)
        rank = f"[{state.process_index + 1}/{state.num_processes}] " if state.num_processes > 1 else ""
        with state.split_between_processes(tasks) as mine:
            rows = evaluator.run(mine, log=lambda text: print(rank + text, file=sys.stderr, flush=True))
        with state.split_between_processes(list(range(len(reference_images)))) as mine:
            reference_rows = [features.features([reference_images[i][1]]) for i in mine]
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = gather_object(rows)
    reference_rows = gather_object(reference_rows)
    if state.is_main_process:
        order = {task: index for index, task in enumerate(tasks)}
        rows.sort(key=lambda row: order[row.task])
        reference = torch.cat(reference_rows) if reference_rows else None
        write_csv(rows, args.out / "scores.csv")
        (args.out / "report.md").write_text(
            report(rows, args, text_to_image, clip.label, features.label, reference, len(prompts)), encoding="utf-8")
        print(f"Wrote {len(rows)} images, {args.out / 'scores.csv'} and {args.out / 'report.md'}.")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

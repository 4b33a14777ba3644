"""Model loads and wall time of a Compare grid in our order (cells grouped by preset), in the plain axis order, and
in A1111's own order.

The grid: X = 3 presets, Y = 4 samplers (12 cells), each preset Stable Diffusion 1.5's architecture with random
weights (bench/shared_memory.py's fp16 folder, hard-linked into three folders so that the manager sees three
models), on the CPU in float32 at 64x64 px and 2 steps, with a device budget that holds two presets but not
three. Every order runs the same engine (studio.evaluation.compare.Comparison) on the same cells; only the order differs:

  (a) ours:       the cells grouped by preset (GridSpec.run_order), each preset loaded once;
  (b) axis order: Z, then Y, then X innermost (GridSpec.cells()), which is A1111's nesting when its axes cost the
                  same. Here the preset changes every cell, and with room for two of three presets every change
                  is a load;
  (c) A1111:      A1111's xyz_grid.py moves the axis it marks costliest (Checkpoint name, cost 1.0) to the
                  outermost loop, so its cells run in (a)'s order here; once the grid is done its
                  SharedSettingsStackHelper restores the checkpoint it started with, which has been evicted by
                  then: (a) and then that reload, on the same manager and budget. (A1111 also holds one checkpoint
                  by default, sd_checkpoints_limit = 1, which changes nothing in this order.)

Each order runs in a fresh subprocess from nothing loaded, twice, alternating (ours, axis, A1111, ours, axis,
A1111), after the files have been read once into the page cache, so no order gets a colder cache: a load here is mostly the
fp16 → fp32 copy; from a disk it costs more. Prints each order's UNet loads, seconds spent loading (measured around
the loaders: reading and converting weights; evictions and freeing memory count in the wall time only) and wall
time (the faster of its two runs), and the ratios to ours.

    python bench/compare_loads.py     # about 6 minutes on 2 cores (and a few to build the folder the first time)
    python bench/compare_loads.py --smoke  # 3 presets x 2 samplers of tiny weights, each order once, the three in
                                           # one subprocess (each on engines of its own): the same code, figures
                                           # meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PRESETS = ("sd15-random-a", "sd15-random-b", "sd15-random-c")
SAMPLERS = "Euler, Euler a, DPM++ 2M, DDIM"
SMOKE_SAMPLERS = "Euler, DDIM"
STEPS = 2
SIZE = 64
RESULT_PREFIX = "RESULT "
ORDERS = ("ours", "axis", "a1111")


class TimedLoader:
    """A manager's loader, wrapped to record what it loads and the seconds it takes (the measured load cost)."""

    def __init__(self, loader, record: list):
        self.loader, self.record = loader, record

    def size(self, key, dtype):
        return self.loader.size(key, dtype)

    def load(self, key, dtype):
        began = time.perf_counter()
        model = self.loader.load(key, dtype)
        self.record.append((key.part or key.kind, time.perf_counter() - began))
        return model


def presets_file(folder: Path, out: Path) -> Path:
    """Three presets over three hard-linked copies of one SD 1.5-size folder."""
    import yaml

    entries = {}
    for name in PRESETS:
        copy = out / name
        for path in folder.rglob("*"):
            if path.is_file():
                target = copy / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.link(path, target)
        entries[name] = dict(label=name, local=str(copy), family="sd15", description="random SD 1.5 weights",
                             default_steps=STEPS, default_width=SIZE, default_height=SIZE, min_size=SIZE,
                             default_scheduler="Euler", default_guidance=7.0)
    path = out / "models.yaml"
    path.write_text(yaml.safe_dump({"default": PRESETS[0], "presets": entries}))
    return path


def preset_bytes(folder: Path) -> int:
    """float32 bytes of one preset's weights (the fp16 files, doubled)."""
    return 2 * sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


def run_one(order: str, presets_path: Path, budget: int, samplers: str) -> dict:
    """In this (fresh) process: the grid in `order`, returning loads and seconds."""
    from studio.evaluation.compare import CompareRequest, Comparison
    from studio.models.presets import load_presets
    from studio.tasks.engines import local_engines

    text_to_image = local_engines(load_presets(presets_path), device_budget=budget).text_to_image
    comparison = Comparison(text_to_image)
    plan = comparison.plan(CompareRequest(prompt="a red circle on a blue background", seed=1, x_type="Preset",
                                          x_values=", ".join(PRESETS), y_type="Sampler", y_values=samplers))
    if order == "axis":
        by_cell = dict(zip(plan.cells, plan.plans))
        plan.cells = plan.grid.cells()
        plan.plans = [by_cell[cell] for cell in plan.cells]
    first_preset = plan.plans[0].preset
    manager, record = text_to_image.manager, []
    manager.loaders = {kind: TimedLoader(loader, record) for kind, loader in manager.loaders.items()}
    began = time.perf_counter()
    with comparison.model_files(plan) as plan:
        result = comparison.run(plan)
        if order == "a1111":  # the checkpoint it started with, restored after the grid
            manager.preload(text_to_image.models.keys(first_preset, "text2img"))
    seconds = time.perf_counter() - began
    assert len([cell for cell in result.cells if cell.image]) == len(plan.cells)
    order_names = [cell.value("preset") for cell in plan.cells]
    return {"loads": len(record), "unet_loads": sum(part == "unet" for part, _ in record),
            "load_seconds": sum(seconds for _, seconds in record), "seconds": seconds, "order": order_names,
            "images": {f"{c.cell.x},{c.cell.y}": hashlib.sha256(c.image.image.tobytes()).hexdigest()
                       for c in result.cells}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="3 presets of tiny weights x 2 samplers, each order "
                        "once, to check that the script runs")
    parser.add_argument("--child", nargs=3, metavar=("ORDERS", "PRESETS_FILE", "SAMPLERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # ORDERS: comma-separated, each run on fresh engines (nothing loaded), a RESULT line each
        orders, presets_path, samplers = args.child
        for order in orders.split(","):
            result = run_one(order, Path(presets_path), int(os.environ["BENCH_BUDGET"]), samplers)
            print(RESULT_PREFIX + json.dumps({"order_name": order, **result}), flush=True)
        return
    from shared_memory import ensure_folder

    # --smoke: shared_memory's folder of tiny widths, 2 samplers, each order once
    folder, built = ensure_folder(tiny=args.smoke)
    if built:
        print(f"built the {'tiny' if args.smoke else 'SD 1.5-size'} folder in {built:.0f} s")
    samplers, runs = (SMOKE_SAMPLERS, 1) if args.smoke else (SAMPLERS, 2)
    out = Path(tempfile.gettempdir()) / f"studio-bench-compare-loads{'-smoke' if args.smoke else ''}"
    presets_path = presets_file(folder, out)
    one = preset_bytes(folder)
    budget = int(2.5 * one)  # two presets and their working memory, not three
    if args.smoke:  # tiny weights: the encode stage's fixed working memory outweighs all three presets
        import torch

        from studio.models.families import family_named

        budget += family_named("sd15").stage_working_memory("encode", 0, 0, torch.float32, guidance=True)
    print(f"3 presets x {len(samplers.split(','))} samplers, {STEPS} steps at {SIZE} px; one preset "
          f"{one / 1024**3:.2f} GiB in float32, device budget {budget / 1024**3:.2f} GiB (holds two)")
    for path in folder.rglob("*.safetensors"):  # into the page cache before either order runs
        path.read_bytes()
    results = {}
    # a process per order and run; in the smoke run one process runs the three (a process costs ~8 s of imports)
    children = [",".join(ORDERS)] if args.smoke else list(ORDERS) * runs
    for orders in children:
        child = subprocess.run([sys.executable, __file__, "--child", orders, str(presets_path), samplers],
                               capture_output=True, text=True, env={**os.environ, "BENCH_BUDGET": str(budget)},
                               cwd=ROOT)
        lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if child.returncode or len(lines) != len(orders.split(",")):
            sys.exit(f"{orders} failed:\n{child.stderr[-3000:]}")
        for line in lines:
            result = json.loads(line[len(RESULT_PREFIX):])
            order = result.pop("order_name")
            if order not in results or result["seconds"] < results[order]["seconds"]:
                results[order] = result
    assert results["ours"]["images"] == results["axis"]["images"] == results["a1111"]["images"], \
        "the orders made different images"
    for order, label in (("ours", "ours (grouped by preset)"), ("axis", "axis order (X innermost)"),
                         ("a1111", "A1111 (costly axis outside)")):
        r = results[order]
        switches = sum(a != b for a, b in zip(r["order"], r["order"][1:]))
        print(f"  {label:28s} {switches:2d} preset changes, {r['unet_loads']:2d} UNet loads ({r['loads']:2d} loads of "
              f"any part), {r['load_seconds']:5.1f} s loading, {r['seconds']:6.1f} s in all")
    ours = results["ours"]
    for order in ("axis", "a1111"):
        other = results[order]
        print(f"ratio {order} / ours: UNet loads {other['unet_loads'] / ours['unet_loads']:.2f}, seconds loading "
              f"{other['load_seconds'] / ours['load_seconds']:.2f}, wall time {other['seconds'] / ours['seconds']:.2f}")
    print("(most of the wall time here is the SD 1.5-size UNet computing on the CPU; where it computes faster, the "
          "loads are a larger share)")
    print(f"the same {len(ours['images'])} images in every order (sha256 of the pixels): yes")


if __name__ == "__main__":
    main()

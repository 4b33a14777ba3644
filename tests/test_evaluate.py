"""`python -m studio.evaluate`: images, per-image scores and a report; two processes (torchrun, as accelerate scales
out) write the same files as one, bit for bit."""

import csv
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import yaml

from studio.embedded import scenes
from studio.evaluate import all_tasks, bootstrap_interval
from studio.metadata import read_parameters
from tests.conftest import ROOT

PROMPTS = ["a red circle on a blue background", "a large yellow star at the top left on a black background",
           "a red circle and a blue star"]  # two shapes: the oracle does not judge it


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    presets = yaml.safe_load((ROOT / "presets" / "models.yaml").read_text())["presets"]
    embedded = {**presets["embedded"], "local": str(ROOT / "models" / "embedded-sd"),
                "inpaint_local": str(ROOT / "models" / "embedded-sd-inpainting")}
    (folder / "models.yaml").write_text(yaml.safe_dump({"default": "embedded", "presets": {
        "embedded": embedded, "embedded-8-steps": {**embedded, "default_steps": 8}}}))
    (folder / "prompts.txt").write_text("# prompts\n" + "\n\n".join(PROMPTS) + "\n")
    reference = folder / "reference"
    reference.mkdir()
    rng = random.Random(9)
    for index in range(8):
        scenes.render(scenes.random_scene(rng)).save(reference / f"{index}.png")
    return folder


def evaluate(inputs, out, processes: int, *extra):
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    return subprocess.run(
        [*launcher, "-m", "studio.evaluate", "--presets", "embedded,embedded-8-steps", "--prompts",
         str(inputs / "prompts.txt"), "--seeds", "2", "--seed", "5", "--out", str(out), "--reference",
         str(inputs / "reference"), "--presets-file", str(inputs / "models.yaml"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_two_processes_write_the_same_files_as_one_bit_for_bit(inputs, tmp_path):
    one = evaluate(inputs, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = evaluate(inputs, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[1/2]" in two.stderr and "[2/2]" in two.stderr  # the work really was split
    written_by_one, written_by_two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(written_by_one) == 2 * 3 * 2 + 2  # every preset × prompt × seed, the CSV and the report
    assert written_by_one.keys() == written_by_two.keys()
    different = [name for name in written_by_one if written_by_one[name] != written_by_two[name]]
    assert not different, different

    with open(tmp_path / "one" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["preset"], r["prompt_index"], r["seed"]) for r in rows] == [
        (preset, str(index), str(seed)) for preset in ("embedded", "embedded-8-steps") for index in range(3)
        for seed in (5, 6)]
    for row in rows:
        parameters = read_parameters(tmp_path / "one" / row["image"])
        assert f"Seed: {row['seed']}" in parameters and row["prompt"] in parameters
        assert f"Steps: {8 if row['preset'] == 'embedded-8-steps' else 20}," in parameters
        assert 0 < float(row["clip_score"]) <= 100
        assert (row["oracle"] == "") == (row["prompt"] == PROMPTS[2])  # judged where the prompt can be read
    # each image is its own: another seed, or the same seed at 8 steps, gives other pixels
    assert written_by_one["images/embedded/0000-5.png"] != written_by_one["images/embedded/0000-6.png"]
    assert written_by_one["images/embedded/0000-5.png"] != written_by_one["images/embedded-8-steps/0000-5.png"]

    report = (tmp_path / "one" / "report.md").read_text()
    assert "## embedded\n" in report and "## embedded-8-steps\n" in report
    assert report.count("| CLIP score (95% CI) |") == 2 and report.count("| FID vs reference |") == 2
    assert report.count("| oracle accuracy |") == 2 and "(8 images), features: embedded CLIP, offline" in report
    judged = [r for r in rows if r["preset"] == "embedded" and r["oracle"]]
    right = sum(r["oracle"] == "1" for r in judged)
    assert f"| oracle accuracy | {100 * right / len(judged):.1f}% ({right}/{len(judged)}) |" in report


def test_bad_input_gets_a_clear_message(inputs, tmp_path):
    unknown = subprocess.run([sys.executable, "-m", "studio.evaluate", "--presets", "embedded,nope", "--prompts",
                              str(inputs / "prompts.txt"), "--out", str(tmp_path), "--presets-file",
                              str(inputs / "models.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert unknown.returncode != 0 and "unknown preset(s) nope. Available: embedded, embedded-8-steps" in unknown.stderr
    missing = subprocess.run([sys.executable, "-m", "studio.evaluate", "--presets", "embedded", "--prompts",
                              str(tmp_path / "none.txt"), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and "none.txt does not exist" in missing.stderr


def test_tasks_and_the_interval():
    tasks = all_tasks(["a", "b"], ["p", "q"], 2, first_seed=10)
    assert [(t.preset, t.prompt_index, t.seed) for t in tasks] == [
        ("a", 0, 10), ("a", 0, 11), ("a", 1, 10), ("a", 1, 11), ("b", 0, 10), ("b", 0, 11), ("b", 1, 10), ("b", 1, 11)]
    values = np.random.default_rng(1).normal(50, 5, size=400)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * 5 / np.sqrt(400), rel=0.15)  # the normal theory width
    assert bootstrap_interval(values) == (low, high)  # fixed: the report is the same file on every run

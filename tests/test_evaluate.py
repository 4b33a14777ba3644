"""`python -m studio.evaluation`: images, per-image scores and a report; two processes (torchrun, as accelerate scales
out) write the same files as one, bit for bit."""

import csv
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import studio.evaluation.evaluate
from studio.a1111.metadata import read_parameters
from studio.embedded import scenes
from studio.evaluation.evaluate import all_tasks, bootstrap_interval
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
    # --standalone: a free port of its own, so two runs at once (CI and a developer) do not collide
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run(
        [*launcher, "-m", "studio.evaluation", "--presets", "embedded,embedded-8-steps", "--prompts",
         str(inputs / "prompts.txt"), "--seeds", "3", "--seed", "5", "--out", str(out), "--reference",
         str(inputs / "reference"), "--presets-file", str(inputs / "models.yaml"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_two_processes_write_the_same_files_as_one_bit_for_bit(inputs, tmp_path):
    one = evaluate(inputs, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = evaluate(inputs, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    # the work really was split: each preset's 9 images shared out 5 + 4, so a split falls inside a prompt's seeds
    assert two.stderr.count("[process 1/2 on ") == 10 and two.stderr.count("[process 2/2 on ") == 8, \
        two.stderr[-2000:]
    written_by_one, written_by_two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(written_by_one) == 2 * 3 * 3 + 2  # every preset × prompt × seed, the CSV and the report
    assert written_by_one.keys() == written_by_two.keys()
    different = [name for name in written_by_one if written_by_one[name] != written_by_two[name]]
    assert not different, different

    with open(tmp_path / "one" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["preset"], r["prompt_index"], r["seed"]) for r in rows] == [
        (preset, str(index), str(seed)) for preset in ("embedded", "embedded-8-steps") for index in range(3)
        for seed in (5, 6, 7)]
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


def run_cli(*arguments, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "studio.evaluation", *map(str, arguments)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def bad_inputs(inputs, tmp_path, arguments: str) -> list[str]:
    """The command line `arguments` (with {dir} for tmp_path, where the bad files are), completed with the good
    prompts and presets files where they name none."""
    (tmp_path / "latin1.txt").write_bytes("un cercle rouge sur fond bleu, café".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a red circle on a blue background\n")
    (tmp_path / "reference").symlink_to(inputs / "reference")
    (tmp_path / "one-image").mkdir()
    (tmp_path / "one-image" / "0.png").write_bytes((inputs / "reference" / "0.png").read_bytes())
    (tmp_path / "broken.yaml").write_text("presets: [unclosed\n")
    given = arguments.format(dir=tmp_path).split()
    if "--prompts" not in given:
        given += ["--prompts", str(inputs / "prompts.txt")]
    if "--presets-file" not in given:
        given += ["--presets-file", str(inputs / "models.yaml")]
    return [*given, "--out", str(tmp_path / "out")]


# Found once the processes and the engine are set up: each in a process of its own, as a user runs it
@pytest.mark.parametrize("arguments, message", [
    ("--presets embedded,nope", "Unknown preset(s) nope. Available: embedded, embedded-8-steps."),
    ("--presets embedded --reference {dir}/one-image", "FID needs at least 2 reference images"),
    ("--presets embedded --presets-file {dir}/broken.yaml", "broken.yaml could not be read"),
    ("--presets embedded --seeds 0", "--seeds must be at least 1"),  # and one of the command line's own
])
def test_bad_input_gets_a_clear_message_before_any_image_is_made(inputs, tmp_path, arguments, message):
    result = run_cli(*bad_inputs(inputs, tmp_path, arguments))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(dir=tmp_path) in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "images").exists()


# Found in the command line and its files, before anything global (torch's settings, accelerate's state) is set:
# run in this process (a process each cost 8 s of imports)
@pytest.mark.parametrize("arguments, message", [
    ("--presets ,", "name at least one preset"),
    ("--presets embedded,embedded", "embedded named twice"),
    ("--presets embedded --seed -1", "--seed must be between 0 and"),
    ("--presets embedded --prompts {dir}/missing.txt", "missing.txt does not exist"),
    ("--presets embedded --prompts {dir}/latin1.txt", "latin1.txt is not UTF-8 text"),
    ("--presets embedded --prompts {dir}/one.txt --seeds 1 --reference {dir}/reference",
     "FID needs at least 2 images per preset"),
    ("--presets embedded --reference {dir}/nowhere", "--reference {dir}/nowhere is not a folder of images"),
    ("--presets embedded --device-budget 6XB", "argument --device-budget"),
    ("--presets embedded --presets-file {dir}/none.yaml", "--presets-file {dir}/none.yaml does not exist"),
])
def test_a_bad_command_line_is_refused_before_anything_starts(inputs, tmp_path, capsys, arguments, message):
    deterministic = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(SystemExit) as exited:
        studio.evaluation.evaluate.main(bad_inputs(inputs, tmp_path, arguments))
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert message.format(dir=tmp_path) in error and "Traceback" not in error, error
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # nothing global was touched
    assert not (tmp_path / "out").exists()


def test_a_fault_in_one_process_stops_every_process_after_that_preset(inputs, tmp_path):
    """The last image's file is in the way (a folder): only the second process meets it; both stop, none waits."""
    blocked = tmp_path / "out" / "images" / "embedded" / "0002-5.png"
    blocked.mkdir(parents=True)
    result = run_cli("--presets", "embedded", "--prompts", inputs / "prompts.txt", "--seeds", "1", "--seed", "5",
                     "--out", tmp_path / "out", "--presets-file", inputs / "models.yaml", processes=2)
    assert result.returncode != 0
    assert "error: [process 2/2 on " in result.stderr and "IsADirectoryError" in result.stderr, result.stderr[-3000:]
    assert "exitcode  : 2 " in result.stderr and "exitcode  : 1 " not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_a_problem_in_one_process_is_reported_by_all_without_a_traceback(inputs, tmp_path):
    """A prompt too long for the studio is found when every task is planned, on every process, before any image."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n" + "a red circle " * 200 + "\n")
    result = run_cli("--presets", "embedded", "--prompts", prompts, "--seeds", "1", "--out", tmp_path / "out",
                     "--presets-file", inputs / "models.yaml", processes=2)
    assert result.returncode != 0
    assert result.stderr.count("embedded, prompt 2: Prompt is too long") == 1, result.stderr[-3000:]
    # the processes stopped on it with status 2 (torchrun then stops any still exiting, and prints its own summary
    # of that); none crashed
    assert "exitcode  : 2 " in result.stderr and "exitcode  : 1 " not in result.stderr, result.stderr[-3000:]
    assert f'File "{ROOT / "studio"}' not in result.stderr and "[rank" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "images").exists()


def test_tasks_and_the_interval():
    tasks = all_tasks(["a", "b"], ["p", "q"], 2, first_seed=10)
    assert [(t.preset, t.prompt_index, t.seed) for t in tasks] == [
        ("a", 0, 10), ("a", 0, 11), ("a", 1, 10), ("a", 1, 11), ("b", 0, 10), ("b", 0, 11), ("b", 1, 10), ("b", 1, 11)]
    values = np.random.default_rng(1).normal(50, 5, size=400)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * 5 / np.sqrt(400), rel=0.15)  # the normal theory width
    assert bootstrap_interval(values) == (low, high)  # fixed: the report is the same file on every run


def test_a_hub_preset_offline_is_named_before_any_image_is_made(inputs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "studio.evaluation", "--presets", "embedded,stable-diffusion-1.5",
                             "--prompts", str(inputs / "prompts.txt"), "--seeds", "1", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Preset 'Stable Diffusion 1.5' is not downloaded yet" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "images").exists()

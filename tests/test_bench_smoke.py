"""Every bench/ script runs end to end in its --smoke mode (the same code on the smallest inputs) and still prints
its figures, so no benchmark rots. The figures themselves are not judged: benchmarks are not timed tests."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"-?\d+(?:\.\d+)?"

# script -> a line it prints with its result (a regular expression, searched in its output)
RESULT_LINES = {
    "api_overhead.py": rf"http +API +: +{NUMBER} ms +ratio {NUMBER}",
    "compare_loads.py": rf"ratio axis / ours: UNet loads {NUMBER}, seconds loading {NUMBER}, wall time {NUMBER}",
    "device_plan.py": rf"sdxl-base-1\.0 1024x1024 fp16: peak {NUMBER} GiB, budget 8\.0 GiB: fits(.|\n)*"
                      rf"flux\.1-dev 1024x1024 bf16: peak {NUMBER} GiB, budget 8\.0 GiB: fits\n.*blocks streamed",
    "embedded_speed.py": rf"ratio to the 0\.5 s target: {NUMBER}",
    "fairness.py": rf"--concurrency 4: quick image alone {NUMBER} s, .* ratio {NUMBER}",
    # the engine runs every case of the smoke run without an error the script did not expect, and every model is
    # where its record says afterwards
    # ... and SD 3 and FLUX reach float8 storage and block streaming where their cases are made to (N/N)
    "gpu_check.py": rf"gpu check: \d+ cases, \d+ stages, NaN in 0, over reserved \d+, placement mismatches 0, "
                    rf"unexpected errors 0, denoise speed ratio sd15 {NUMBER}, sdxl {NUMBER}, TAESD preview cost ratio "
                    rf"{NUMBER}, float8 image difference flux {NUMBER} \(max {NUMBER}\), sd35 {NUMBER} "
                    rf"\(max {NUMBER}\), block streaming time ratio flux {NUMBER}, sd35 {NUMBER}, flow placements as "
                    rf"expected (\d+)/\1 \(",
    "hires_fix.py": rf"time of an image, ratio to a 64 px image:\n  Hires\. fix with Latent +{NUMBER}",
    "inpaint_memory.py": rf"base UNet inpaints \(4-channel\) +{NUMBER} MiB +{NUMBER} MiB +{NUMBER}",
    "outpaint_quality.py": rf"  Matched noise +0\.85 +{NUMBER}% +({NUMBER}|nan)\n(.|\n)*  soft inpainting +\d+ +{NUMBER}% +"
                           rf"({NUMBER}|nan)",
    "lora_overhead.py": rf"ratio {NUMBER}; {NUMBER} ms per image for the adapters",
    "preview_cost.py": rf"ratio {NUMBER} \(target <= 1\.03\); {NUMBER} ms per preview",
    "preview_legibility.py": rf"TAESD +100% in +{NUMBER}% +{NUMBER}% +{NUMBER}% +{NUMBER}%",
    "prompt_weights.py": r"A1111 emphasis \(the studio\): yellow-up greener than red-up in \d+/1 seeds",
    "shared_memory.py": rf"ratio {NUMBER} \(target <= 0\.40",
    "upscale_tiling.py": rf"time, ours ÷ RealESRGANer: {NUMBER}",
    "inpaint_editor_page.py": rf"ratio after / fresh, main-thread busy per image: {NUMBER}; uploads per image: "
                              rf"fresh {NUMBER}, after {NUMBER}",
}
NEEDS = {"inpaint_editor_page.py": pytest.mark.browser}  # Chromium (tests/system_tools.py skips or fails without)
# One thread per process: the smoke runs' ops are tiny, and on a busy machine OpenMP's spin-waiting threads made
# them 4x slower (compare_loads' grid: 24 s with 2 threads, 5.7 s with 1, with other work on the 2 cores).
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_every_bench_script_has_a_smoke_test():
    assert sorted(RESULT_LINES) == sorted(path.name for path in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", [pytest.param(name, marks=NEEDS.get(name, ())) for name in RESULT_LINES])
def test_bench_script_runs_in_smoke_mode_and_prints_its_result(script):
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ENVIRONMENT}, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit code {done.returncode}:\n{output[-4000:]}"
    assert re.search(RESULT_LINES[script], done.stdout), f"no line matching {RESULT_LINES[script]!r} in:\n{done.stdout}"


class FakeInfo:
    """GET /gradio_api/info of an endpoint whose parameters are `parameters` (name -> default, or ... for none)."""

    def __init__(self, parameters: dict):
        self.parameters = parameters

    def get(self, url):
        parameters = [{"parameter_name": name, "parameter_has_default": default is not ...,
                       **({"parameter_default": default} if default is not ... else {})}
                      for name, default in self.parameters.items()]
        info = {"named_endpoints": {"/text_to_image": {"parameters": parameters}}}
        return type("Response", (), {"json": lambda self: info})()


def test_api_overhead_calls_the_endpoint_by_name_whatever_parameters_it_grows(monkeypatch):
    """The benchmark rotted once when the endpoint grew: it now sends its values by name, in the order the API
    documents, and a parameter it does not know keeps its default."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the script's own setdefault leaves the tests' environment alone
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from api_overhead import endpoint_inputs

    grown = FakeInfo({"prompt": ..., "new_first": "a", "steps": 20, "seed": -1, "new_last": 0.5})
    assert endpoint_inputs(grown, "", "text_to_image", prompt="p", seed=1) == ["p", "a", 20, 1, 0.5]
    with pytest.raises(SystemExit, match="no parameter colour"):
        endpoint_inputs(grown, "", "text_to_image", prompt="p", colour="red")
    with pytest.raises(SystemExit, match="needs prompt"):
        endpoint_inputs(grown, "", "text_to_image", seed=1)

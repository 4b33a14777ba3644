import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# The tests run in parallel, a pytest-xdist worker per core (pytest.ini). One thread each for PyTorch's CPU work,
# here and in the apps the tests start (they inherit the variable): two threads in each of two workers on two cores
# made some tests ten times slower (OpenMP threads spin while they wait for a core). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402

from studio.models.loras import LoraCatalog  # noqa: E402
from studio.models.presets import load_presets  # noqa: E402
from studio.tasks.engines import local_engines  # noqa: E402

# Tests that need Chromium or PostgreSQL's server tools are marked so; without them they are skipped, except in CI.
# Tests that need a CUDA GPU are marked `cuda`; without one they are skipped, in CI too (tests/accelerators.py).
pytest_plugins = ["system_tools", "accelerators"]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
APP_LOGS: dict[str, Path] = {}  # url -> the log file of the app serving it


@pytest.fixture(scope="session", autouse=True)
def arena_votes_elsewhere(tmp_path_factory):
    """Studios built in the tests keep their Arena votes in a folder of the test run, not in the checkout's ./data."""
    saved = os.environ.pop("DIFFUSION_STUDIO_VOTES_DB", None)  # a developer's Space database: never the tests'
    os.environ["DIFFUSION_STUDIO_DATA"] = str(tmp_path_factory.mktemp("data"))
    yield
    os.environ.pop("DIFFUSION_STUDIO_DATA", None)
    if saved is not None:
        os.environ["DIFFUSION_STUDIO_VOTES_DB"] = saved


@pytest.fixture(scope="session")
def engines():
    """The engines most tests share: one manager on the CPU (4 GiB), the presets files, no LoRAs."""
    return local_engines(load_presets(), device_budget=4 * 1024**3, loras=LoraCatalog({}), version="Diffusion Studio test")


@pytest.fixture(scope="session")
def models(engines):
    return engines.models


@pytest.fixture(scope="session")
def manager(engines):
    return engines.manager


@pytest.fixture(scope="session")
def stages(engines):
    return engines.stages


@pytest.fixture(scope="session")
def engine(engines):
    return engines.text_to_image


@pytest.fixture(scope="session")
def inpainter(engines):
    return engines.inpainter


@pytest.fixture(scope="session")
def artifacts():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (rep_setup, rep_call), so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(arguments: list[str], folder) -> tuple[str, subprocess.Popen]:
    """The real app (python app.py ...) in a subprocess, as a user starts it; (url, process) once it answers."""
    port = free_port()
    log = folder / "app.log"
    if "--data-dir" not in arguments and "--votes-db" not in arguments:
        arguments = [*arguments, "--data-dir", str(folder / "data")]  # the Arena's votes: the test's own
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *arguments], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT,
                                   # offline even where the Hub answers: a test must never start a download
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # "Running on local URL" is printed before the server answers: poll the API info instead
        try:
            if httpx.get(f"{url}/gradio_api/info", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"app did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    APP_LOGS[url] = log
    return url, process


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def app_loras(tmp_path_factory):
    """A folder with a random LoRA for the embedded model, "test-shapes", which says it teaches "hexagon" (the
    apps the tests start offer it, so the LoRA mechanics are tested without a trained file), and one for another
    family, "another-family" (first by name: the picker must leave it out for the embedded preset)."""
    import json

    from tiny_models import EMBEDDED, save_random_lora, save_tiny_sd2

    folder = tmp_path_factory.mktemp("loras")
    save_random_lora(EMBEDDED, folder / "test-shapes.safetensors", seed=5,
                     metadata={"studio.vocabulary": json.dumps(["hexagon"])})
    sd2 = save_tiny_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2")
    save_random_lora(sd2, folder / "another-family.safetensors", seed=6)
    return folder


@pytest.fixture(scope="session")
def app_url(tmp_path_factory, app_loras):
    """The real app (python app.py), as a user starts it (its LoRA folder: the test LoRA)."""
    url, process = start_app(["--loras-dir", str(app_loras)], tmp_path_factory.mktemp("app"))
    yield url
    stop_app(process)

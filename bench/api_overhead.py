"""Time per image through the gradio API (client -> server -> PNG file) / the bare diffusers call in process.

Same preset (embedded), prompt, steps, size and seed; the runs alternate in one process tree so the machine's
noise hits all alike. Two API clients are timed, both ending with the PNG file on the client's disk:
- "http": gradio's documented HTTP API (POST /gradio_api/call/text_to_image, read the SSE result, GET the PNG);
- "gradio_client": Client.predict, which polls its message queue every 50 ms (a fixed client-side latency).
Prints the ratio of medians for each (target <= 1.05 through HTTP; gradio_client adds its own polling latency on
top), the spread (quartiles of the times, and of each round's ratio to that round's bare call) and the machine's
load average during the run: on a shared machine, compare ratios only from runs at a similar load.

    python bench/api_overhead.py [--rounds 15] [--steps 20] [--batch-size 1]
    python bench/api_overhead.py --smoke  # 1 round of 1 step: the same code, figures meaningless (the tests run it)
"""

from __future__ import annotations

import os

# Two busy processes share 2 cores here: OpenMP's default spin-wait after each op would let the idle side's
# worker threads steal CPU from the timed side (measured: the ratio swung 1.08-1.37). Both processes wait
# passively instead; the app itself runs alone in production and keeps the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(port: int, *flags: str) -> subprocess.Popen:
    """`python app.py` on `port`, offline (a benchmark never downloads), returned once its API answers."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *flags], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:  # "Running on local URL" is printed before the server answers: poll the API info instead
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise SystemExit(f"the app did not start:\n{log.read()[-3000:]}")


def endpoint_inputs(http: httpx.Client, base: str, api_name: str, **values) -> list:
    """The endpoint's inputs in its order: `values` by parameter name, the others at the defaults the API documents
    (GET /gradio_api/info), so that the call keeps up with the app's signature as it grows (a new parameter with a
    default is sent at its default; one without a default is named in the error)."""
    parameters = http.get(f"{base}/info").json()["named_endpoints"][f"/{api_name}"]["parameters"]
    unknown = set(values) - {parameter["parameter_name"] for parameter in parameters}
    if unknown:
        raise SystemExit(f"/{api_name} has no parameter {', '.join(sorted(unknown))}")
    missing = [parameter["parameter_name"] for parameter in parameters
               if parameter["parameter_name"] not in values and not parameter.get("parameter_has_default")]
    if missing:
        raise SystemExit(f"/{api_name} needs {', '.join(missing)}, which the benchmark does not give")
    return [values[parameter["parameter_name"]] if parameter["parameter_name"] in values
            else parameter.get("parameter_default") for parameter in parameters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--port", type=int, help="the app's port (default: a free one)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds of quiet before each timed run")
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 step, to check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.settle = 1, 1, 0.0
    args.port = args.port or free_port()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from gradio_client import Client

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "embedded-sd", use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def bare() -> None:
        for index in range(args.batch_size):
            pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.0, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(1 + index)).images[0]

    app = start_app(args.port)
    try:
        client = Client(f"http://127.0.0.1:{args.port}", verbose=False)

        base = f"http://127.0.0.1:{args.port}/gradio_api"
        http = httpx.Client(timeout=60)
        # by name: the endpoint takes its parameters as keywords (gradio's inputs_kwargs), and the ones not given
        # here keep their documented defaults
        values = dict(prompt=PROMPT, negative_prompt="", preset="embedded", scheduler="Euler", steps=args.steps,
                      guidance_scale=7.0, width=64, height=64, seed=1, batch_size=args.batch_size, style="None")
        inputs = endpoint_inputs(http, base, "text_to_image", **values)

        def via_gradio_client() -> None:
            gallery, _, _ = client.predict(api_name="/text_to_image", **values)
            assert len(gallery) == args.batch_size and Path(gallery[0]["image"]).exists()

        def via_http() -> None:
            event_id = http.post(f"{base}/call/text_to_image", json={"data": inputs}).json()["event_id"]
            stream = http.get(f"{base}/call/text_to_image/{event_id}").text
            if "event: complete\ndata: " not in stream:
                raise SystemExit(f"the API did not complete the call: {stream[-500:]!r}")
            result = json.loads(stream.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])
            for item in result[0]:
                png = http.get(item["image"]["url"]).content
                assert png.startswith(b"\x89PNG")

        runs = (("bare", bare), ("http", via_http), ("gradio_client", via_gradio_client))
        for _, warm_up in runs:
            warm_up()
        times = {name: [] for name, _ in runs}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, run in runs:
                # Let the other process's OpenMP threads stop spinning after its last op: on 2 cores they
                # would otherwise steal CPU from whichever side runs next.
                time.sleep(args.settle)
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.batch_size)
            loads.append(os.getloadavg()[0])
    finally:
        app.terminate()
        app.wait(timeout=20)

    bare_s = statistics.median(times["bare"])
    print(f"per image, median of {args.rounds} rounds ({args.steps} steps, 64x64, batch {args.batch_size}); 1-minute "
          f"load average during the run {min(loads):.1f}-{max(loads):.1f}:")
    print(f"  bare diffusers call     : {bare_s * 1000:7.1f} ms   (quartiles {quartiles(times['bare'], 1000, '.0f')} ms)")
    for name in ("http", "gradio_client"):
        api_s = statistics.median(times[name])
        ratios = [api / bare for api, bare in zip(times[name], times["bare"])]
        print(f"  {name:<14} API     : {api_s * 1000:7.1f} ms   ratio {api_s / bare_s:.3f}  (target <= 1.05)   "
              f"quartiles {quartiles(times[name], 1000, '.0f')} ms; per round: ratio {statistics.median(ratios):.3f}, "
              f"quartiles {quartiles(ratios, 1, '.3f')}")


def quartiles(values: list[float], scale: float, form: str) -> str:
    """The first and third quartiles of `values` × `scale` ("a-b"); the one value twice for a single round."""
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{low * scale:{form}}-{high * scale:{form}}"


if __name__ == "__main__":
    main()

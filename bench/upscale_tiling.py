"""Tiled ×4 upscaling of 512² → 2048² with a RealESRGAN_x4plus-size RRDBNet (random weights) on the CPU: ours
(overlapping tiles blended with a feathered window) against untiled and against RealESRGANer with the same tile.

Prints ratios within this run (the machine is noisy): peak memory of tiled ÷ untiled (target ≤ 0.35), the largest
pixel difference from the untiled result for ours and for RealESRGANer, and ours' time ÷ RealESRGANer's. Each
variant runs in its own process, so each peak is its own (ru_maxrss above the process's baseline once the
network is built).

    python bench/upscale_tiling.py [--size 512] [--tile 256]
    python bench/upscale_tiling.py --smoke  # 80² with 64 px tiles (2×2) through a 1-block RRDBNet: the same code,
                                            # figures meaningless (the tests run it)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


X4PLUS_BLOCKS = 23  # RealESRGAN_x4plus's RRDB blocks


def build_network(blocks: int = X4PLUS_BLOCKS):
    import torch

    from studio.models.basicsr_compat import rrdbnet_class

    torch.manual_seed(0)
    network = rrdbnet_class()(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=blocks, num_grow_ch=32, scale=4).eval()
    with torch.no_grad():  # basicsr's init scales the residual blocks by 0.1: widen the output so differences show
        network.conv_last.weight.mul_(10)
    return network


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(variant: str, size: int, tile: int, blocks: int, folder: Path) -> None:
    """One variant, in this process: writes its uint8 result and its figures."""
    import numpy as np
    import torch

    torch.set_grad_enabled(False)
    network = build_network(blocks)
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    baseline = peak_bytes()
    start = time.perf_counter()
    if variant in ("untiled", "ours"):
        from studio.core.tiling import run_tiled

        tensor = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
        output = run_tiled(network, tensor, 4, 0 if variant == "untiled" else tile, "cpu", torch.float32)
        result = (output[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    else:
        from studio.models.basicsr_compat import install_functional_tensor_shim

        install_functional_tensor_shim()
        from realesrgan import RealESRGANer

        weights = folder / "weights.pth"
        torch.save({"params_ema": network.state_dict()}, weights)
        upsampler = RealESRGANer(scale=4, model_path=str(weights), model=network, tile=tile, tile_pad=10, pre_pad=0,
                                 half=False, device=torch.device("cpu"))
        bgr, _ = upsampler.enhance(image[..., ::-1].copy(), outscale=4)
        result = bgr[..., ::-1]
    seconds = time.perf_counter() - start
    np.save(folder / f"{variant}.npy", result)
    (folder / f"{variant}.json").write_text(json.dumps({"peak": peak_bytes() - baseline, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=X4PLUS_BLOCKS, help="the RRDBNet's RRDB blocks")
    parser.add_argument("--smoke", action="store_true",
                        help="80² in 64 px tiles through a 1-block RRDBNet, to check that the script runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:  # the smallest tile run_tiled takes is 64 px; 80 px makes a 2×2 grid of them
        args.size, args.tile, args.blocks = 80, 64, 1
    if args.child:
        child(args.child, args.size, args.tile, args.blocks, Path(args.folder))
        return

    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        figures = {}
        for variant in ("untiled", "ours", "realesrganer"):
            subprocess.run([sys.executable, __file__, "--child", variant, "--folder", folder, "--size", str(args.size),
                            "--tile", str(args.tile), "--blocks", str(args.blocks)], check=True)
            figures[variant] = json.loads((Path(folder) / f"{variant}.json").read_text())
            print(f"{variant:>13}: {figures[variant]['seconds']:7.1f} s, peak above baseline "
                  f"{figures[variant]['peak'] / 2**20:8.0f} MiB", flush=True)
        untiled = np.load(Path(folder) / "untiled.npy").astype(int)
        difference = {v: int(np.abs(np.load(Path(folder) / f"{v}.npy").astype(int) - untiled).max())
                      for v in ("ours", "realesrganer")}
    network = "x4plus-size RRDBNet" if args.blocks == X4PLUS_BLOCKS else f"RRDBNet of {args.blocks} blocks"
    print(f"{network}, {args.size}² → {args.size * 4}², tile {args.tile} (CPU)")
    print(f"peak memory, ours tiled ÷ untiled: {figures['ours']['peak'] / figures['untiled']['peak']:.3f} "
          "(target ≤ 0.35)")
    print(f"largest difference from untiled, 0-255: ours {difference['ours']}, RealESRGANer {difference['realesrganer']}")
    print(f"time, ours ÷ RealESRGANer: {figures['ours']['seconds'] / figures['realesrganer']['seconds']:.2f}")


if __name__ == "__main__":
    main()

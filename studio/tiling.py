"""Seamless tiled inference for image-to-image networks (the upscalers): overlapping tiles, each run with a margin
of context that is thrown away, blended with a feathered window, so the tiled result equals the untiled one
within 1/255 while only one tile's activations are ever on the device. The full-size output stays on the CPU.

RealESRGANer crops and pastes its tiles with no blending, which leaves seams (Real-ESRGAN#211, #197) and keeps
the whole input and output on the device (#184); `bench/upscale_tiling.py` measures both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Context each tile sees beyond what it contributes (input pixels), and the ramp over which two tiles cross-fade.
# A 3x3 conv network's pixel depends on pixels ever further away, but the influence fades fast: 16 pixels keep the
# tiled result within 1/255 of the untiled one for RRDBNet and SRVGGNetCompact (tests/test_upscaling.py).
CONTEXT = 16
FEATHER = 8
MIN_TILE = 2 * (CONTEXT + FEATHER) + 16  # smaller tiles would spend almost all their work on context


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one axis start, for an image `length` pixels long and tiles of `tile` pixels."""

    length: int
    tile: int

    @property
    def starts(self) -> list[int]:
        if self.tile >= self.length:
            return [0]
        stride = self.tile - 2 * CONTEXT - FEATHER  # neighbours share context on both sides plus the feather
        starts = list(range(0, self.length - self.tile, stride))
        return starts + [self.length - self.tile]  # the last tile ends flush with the edge

    def weights(self, start: int, scale: int) -> torch.Tensor:
        """The 1-D blending weight of a tile's output along this axis: 0 over the context a tile has beside a
        neighbour, a linear ramp over the feather, 1 elsewhere (and at the image's own edges)."""
        size = min(self.tile, self.length)
        weight = torch.ones(size * scale)
        ramp = (torch.arange(FEATHER * scale, dtype=torch.float32) + 0.5) / (FEATHER * scale)
        context, feather = CONTEXT * scale, FEATHER * scale
        if start > 0:  # a neighbour before: its pixels take over the first part
            weight[:context] = 0
            weight[context : context + feather] = ramp
        if start + size < self.length:  # a neighbour after
            weight[size * scale - context :] = 0
            weight[size * scale - context - feather : size * scale - context] = ramp.flip(0)
        return weight


def run_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int,
              device: torch.device | str, dtype: torch.dtype,
              on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`model` applied to `image` (1×C×H×W, float on the CPU) tile by tile; returns 1×C×(H·scale)×(W·scale) float32
    on the CPU. `tile` is the tile's side in input pixels (0 or at least the image: one pass). `on_tile(done,
    total)` is called after each tile (progress; it may raise to stop)."""
    _, channels, height, width = image.shape
    if tile <= 0 or (tile >= height and tile >= width):
        with torch.no_grad():
            result = model(image.to(device, dtype)).float().cpu()
        if on_tile:
            on_tile(1, 1)
        return result
    if tile < MIN_TILE:
        raise ValueError(f"A tile must be at least {MIN_TILE} pixels (got {tile}).")
    rows, columns = TileGrid(height, tile), TileGrid(width, tile)
    output, total_weight = None, torch.zeros(1, 1, height * scale, width * scale)
    count, done = len(rows.starts) * len(columns.starts), 0
    for top in rows.starts:
        row_weight = rows.weights(top, scale)
        for left in columns.starts:
            piece = image[:, :, top : top + tile, left : left + tile]
            with torch.no_grad():
                upscaled = model(piece.to(device, dtype)).float().cpu()
            if output is None:
                output = torch.zeros(1, upscaled.shape[1], height * scale, width * scale)
            weight = row_weight[:, None] * columns.weights(left, scale)[None, :]
            rows_out = slice(top * scale, top * scale + upscaled.shape[2])
            columns_out = slice(left * scale, left * scale + upscaled.shape[3])
            output[:, :, rows_out, columns_out] += upscaled * weight
            total_weight[:, :, rows_out, columns_out] += weight
            del upscaled
            done += 1
            if on_tile:
                on_tile(done, count)
    return output.div_(total_weight)

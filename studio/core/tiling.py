"""Seamless tiled inference for image-to-image networks (the upscalers): overlapping tiles, each run with a margin
of context that is thrown away, blended with a feathered window, so the tiled result equals the untiled one
within 1/255 while only one tile's activations are ever on the device. The full-size output stays on the CPU.

RealESRGANer crops and pastes its tiles with no blending, which leaves seams (Real-ESRGAN#211, #197) and keeps
the whole input and output on the device (#184); `bench/upscale_tiling.py` measures both."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Context each tile sees beyond what it contributes (input pixels), and the ramp over which two tiles cross-fade.
# A 3x3 conv network's pixel depends on pixels ever further away, but the influence fades fast: 16 pixels keep the
# tiled result within 1/255 of the untiled one for RRDBNet and SRVGGNetCompact (tests/test_upscaling.py).
CONTEXT = 16
FEATHER = 8
OVERLAP = 2 * CONTEXT + FEATHER  # neighbouring tiles share their context on both sides, and the feather
MIN_TILE = 2 * (CONTEXT + FEATHER) + 16  # smaller tiles would spend almost all their work on context


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one axis, for an image `length` pixels long and tiles of at most `tile` pixels (their sides a
    multiple of `multiple`, for networks that fold pixels into channels): the fewest that cover it with their
    overlap, each no larger than that count needs (less work spent twice), spread evenly."""

    length: int
    tile: int
    multiple: int = 1

    @property
    def size(self) -> int:
        if self.tile >= self.length:
            return self.length
        count = self._count(self.tile)
        size = math.ceil((self.length + (count - 1) * self._overlap) / count)
        return min(self.tile, size + -size % self.multiple)

    @property
    def starts(self) -> list[int]:
        """Multiples of `multiple` too: a network that folds 2×2 pixels into channels must see the same 2×2 groups
        in a tile as in the whole image. Each step is at most size - OVERLAP, so neighbours always share their
        context and the feather."""
        size = self.size
        if size >= self.length:
            return [0]
        count = self._count(size)
        return [index * (self.length - size) // (count - 1) // self.multiple * self.multiple
                for index in range(count)]

    @property
    def _overlap(self) -> int:
        return OVERLAP + self.multiple - 1  # rounding the starts down may widen a step by multiple - 1

    def _count(self, size: int) -> int:
        return math.ceil((self.length - self._overlap) / (size - self._overlap))

    def weights(self, start: int, scale: int) -> torch.Tensor:
        """The 1-D blending weight of a tile's output along this axis: 0 over the context a tile has beside a
        neighbour, a linear ramp over the feather, 1 elsewhere (and at the image's own edges)."""
        size = self.size
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
              on_tile: Callable[[int, int], None] | None = None, multiple: int = 1,
              on_partial: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """`model` applied to `image` (1×C×H×W, float on the CPU) tile by tile; returns 1×C×(H·scale)×(W·scale) float32
    on the CPU. `tile` is the tile's side in input pixels (0 or at least the image: one pass). `on_tile(done,
    total)` is called after each tile (progress; it may raise to stop). Tile sides are kept a multiple of
    `multiple`. `on_partial(output, weight)` sees the output so far after each tile but the last (a live preview:
    output / weight where weight > 0 is what is made; to be read, not kept or changed)."""
    _, channels, height, width = image.shape
    if tile <= 0 or (tile >= height and tile >= width):
        with torch.no_grad():
            result = model(image.to(device, dtype)).float().cpu()
        if on_tile:
            on_tile(1, 1)
        return result
    if tile < MIN_TILE:
        raise ValueError(f"A tile must be at least {MIN_TILE} pixels (got {tile}).")
    rows, columns = TileGrid(height, tile, multiple), TileGrid(width, tile, multiple)
    output, total_weight = None, torch.zeros(1, 1, height * scale, width * scale)
    count, done = len(rows.starts) * len(columns.starts), 0
    for top in rows.starts:
        row_weight = rows.weights(top, scale)
        for left in columns.starts:
            piece = image[:, :, top : top + rows.size, left : left + columns.size]
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
            if on_partial and done < count:
                on_partial(output, total_weight)
    return output.div_(total_weight)

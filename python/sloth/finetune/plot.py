"""The loss curve as a PNG, without a plotting library: a line plot rasterized into an RGB array and written
with zlib + struct (axes, tick marks, a light grid, the per-step loss and its running mean)."""

from __future__ import annotations

import math
import struct
import zlib
from typing import List, Sequence

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)
LIGHT_BLUE, BLUE = (160, 190, 235), (20, 70, 190)


class Canvas:
    """An RGB raster ``height x width`` (row-major bytearray, 3 bytes per pixel) with line drawing."""

    def __init__(self, width: int, height: int, color=WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(color) * (width * height))  # [H, W, 3]

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i: i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: int = 1) -> None:
        """Bresenham line from (x0, y0) to (x1, y1), ``thick`` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.set(x0 + ox - thick // 2, y0 + oy - thick // 2, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def to_png(self) -> bytes:
        """The canvas encoded as an 8-bit RGB PNG."""
        raw = bytearray()
        stride = 3 * self.width
        for y in range(self.height):
            raw.append(0)  # filter type: none
            raw += self.pixels[y * stride: (y + 1) * stride]

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
                + chunk(b"IEND", b""))


def _running_mean(values: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_plot_png(losses: Sequence[float], width: int = 640, height: int = 400) -> bytes:
    """PNG bytes of the loss curve (x: step, y: loss, from min to max with a margin; 5 grid lines each way)."""
    c = Canvas(width, height)
    left, right, top, bottom = 50, width - 20, 20, height - 40
    vals = [v for v in losses if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    for k in range(1, 5):  # grid and ticks
        gx = left + (right - left) * k // 5
        gy = bottom - (bottom - top) * k // 5
        c.line(gx, top, gx, bottom, GREY)
        c.line(left, gy, right, gy, GREY)
        c.line(gx, bottom, gx, bottom + 5, BLACK)
        c.line(left - 5, gy, left, gy, BLACK)
    c.line(left, top, left, bottom, BLACK, 2)  # y axis
    c.line(left, bottom, right, bottom, BLACK, 2)  # x axis
    n = len(losses)

    def xy(i: int, v: float):
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return int(round(x)), int(round(y))

    for series, color, thick in ((list(losses), LIGHT_BLUE, 1), (_running_mean(losses, max(1, n // 20)), BLUE, 2)):
        pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            c.line(x0, y0, x1, y1, color, thick)
        if len(pts) == 1:
            c.line(pts[0][0], pts[0][1], pts[0][0], pts[0][1], color, 3)
    return c.to_png()


def write_loss_plot(path: str, losses: Sequence[float]) -> None:
    """Write the loss curve of ``losses`` (one per optimizer step) to ``path`` as a PNG."""
    with open(path, "wb") as f:
        f.write(loss_plot_png(losses))

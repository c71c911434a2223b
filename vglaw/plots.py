"""Small dependency-free line charts (PIL), for learning curves in demo and README."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def read_metrics(csv_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning CSVLogger metrics.csv -> {column: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or 0)
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    series[k].append((step, float(v)))
    return dict(series)


def _legend_corner(lines: list[list[tuple[float, float]]], frame: tuple[int, int, int, int],
                   box: tuple[int, int]) -> tuple[int, int]:
    """The inner corner of the plot frame whose legend box the curves cross least."""
    x_left, t, r, b = frame
    bw, bh = box
    corners = [(r - bw, t + 6), (r - bw, b - bh), (x_left + 8, t + 6), (x_left + 8, b - bh)]
    samples = [(x0 + (x1 - x0) * k / 20, y0 + (y1 - y0) * k / 20)
               for xy in lines for (x0, y0), (x1, y1) in zip(xy, xy[1:] or xy) for k in range(21)]

    def crossings(corner: tuple[int, int]) -> int:
        cx, cy = corner
        return sum(cx - 4 <= x <= cx + bw and cy - 4 <= y <= cy + bh for x, y in samples)

    return min(corners, key=crossings)


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str,
               size: tuple[int, int] = (640, 360), y_range: tuple[float, float] | None = None) -> Path:
    """Draw each series as a polyline with a legend; writes a PNG and returns its path."""
    w, h = size
    left, right, top, bottom = 56, 16, 28, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        raise ValueError(f"nothing to plot for {title!r}")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = y_range or (min(p[1] for p in pts), max(p[1] for p in pts))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    d.rectangle((left, top, w - right, h - bottom), outline=(0, 0, 0))
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        d.line((left, sy(yv), w - right, sy(yv)), fill=(225, 225, 225))
        d.text((4, sy(yv) - 6), f"{yv:.2f}", fill=(0, 0, 0))
        xv = x0 + (x1 - x0) * k / 4
        d.text((sx(xv) - 10, h - bottom + 6), f"{xv:.0f}", fill=(0, 0, 0))
    d.text((w // 2 - 12, h - 16), "step", fill=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    lines = [[(sx(x), sy(y)) for x, y in sorted(s)] for s in series.values()]
    for i, xy in enumerate(lines):
        colour = COLOURS[i % len(COLOURS)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    lx, ly = _legend_corner(lines, (left, top, w - right, h - bottom), (150, 14 * len(lines) + 6))
    for i, name in enumerate(series):
        d.text((lx, ly + 14 * i), name, fill=COLOURS[i % len(COLOURS)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path

"""Learning curves (matplotlib) from Lightning's metrics.csv, for the demo and the README."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from vglaw.io.atomic import atomic_write


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # loaded when a figure is drawn: the backend must be set before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_image(fig):
    """A drawn matplotlib figure as an RGB PIL image."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


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


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str,
               size: tuple[int, int] = (640, 360), y_range: tuple[float, float] | None = None) -> Path:
    """Each series as a line with markers against the training step; writes a PNG.

    Raises:
        ValueError: no point to plot.
    """
    plt = pyplot()

    if not any(series.values()):
        raise ValueError(f"nothing to plot for {title!r}")
    dpi = 100
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    for name, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.8, label=name)
    if y_range:
        ax.set_ylim(*y_range)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)  # matplotlib puts it where the lines are fewest
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    return path

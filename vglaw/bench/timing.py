"""Timings that can be trusted on a noisy machine: interleaved repeats, min / median / max, and
ratios that say when their spread is too wide to decide a target."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    """Seconds per call over repeats."""

    times: list[float]

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def summary(self) -> dict[str, float]:
        return {"min_s": self.min, "median_s": self.median, "max_s": self.max, "repeats": len(self.times)}

    def text(self, unit: float = 1.0, suffix: str = " s", digits: int = 3) -> str:
        f = lambda v: f"{v * unit:.{digits}f}"  # noqa: E731
        return f"{f(self.median)}{suffix} ({f(self.min)}–{f(self.max)})"


def timeit(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
           sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Seconds per call of each function over `repeats` rounds; within a round the functions run
    one after the other, so drift and other load hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: Timing(v) for k, v in times.items()}


@dataclass
class Ratio:
    """a / b from the same rounds: one ratio per round, so a slow round slows both sides."""

    values: list[float]

    @classmethod
    def of(cls, a: Timing, b: Timing) -> Ratio:
        return cls([x / y for x, y in zip(a.times, b.times)])

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def verdict(self, target: float) -> str:
        """Against "ratio <= target": met, missed, or inconclusive when the rounds disagree."""
        lo, hi = min(self.values), max(self.values)
        if hi <= target:
            return "meets"
        if lo > target:
            return "misses"
        return "inconclusive"

    def text(self, target: float | None = None) -> str:
        lo, hi = min(self.values), max(self.values)
        out = f"{self.median:.3f} ({lo:.3f}–{hi:.3f})"
        if target is not None:
            v = self.verdict(target)
            out += {"meets": f", meets <= {target}", "misses": f", misses <= {target}",
                    "inconclusive": f", spread wider than the target {target}: inconclusive"}[v]
        return out

"""Bounded-memory run statistics for the stream: stage timers, latency quantiles, reservoirs, RSS.

A stream may run for days; nothing here keeps a per-frame history. Every structure has a fixed
size chosen up front, so memory does not grow with the number of frames.
"""
from __future__ import annotations

import math
import os
import random
import threading
from collections import defaultdict


class LogHistogram:
    """Quantiles of positive values (seconds) from log-spaced bins: fixed memory, ~2% relative error."""

    def __init__(self, lo: float = 1e-5, hi: float = 1e4, bins_per_decade: int = 100):
        self.lo, self.per_decade = lo, bins_per_decade
        self.counts = [0] * (int(math.log10(hi / lo) * bins_per_decade) + 2)  # +under/overflow
        self.n, self.total, self.max = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        i = 0 if x <= self.lo else 1 + int(math.log10(x / self.lo) * self.per_decade)
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.n += 1
        self.total += x
        self.max = max(self.max, x)

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank, seen = q * (self.n - 1), 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen > rank:  # report the bin's geometric centre, capped by the true maximum
                return min(self.max, self.lo * 10 ** ((i - 0.5) / self.per_decade)) if i else self.lo
        return self.max


class StageTimes:
    """Total seconds and call counts per pipeline stage; shared by threads, so guarded by a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self.total[stage] += seconds
            self.calls[stage] += calls

    def as_dict(self, frames: int) -> dict:
        with self._lock:
            return {s: {"total_s": round(t, 4), "calls": self.calls[s],
                        "ms_per_call": round(1e3 * t / max(1, self.calls[s]), 3),
                        "ms_per_frame": round(1e3 * t / max(1, frames), 3)}
                    for s, t in self.total.items()}


class Reservoir:
    """A uniform random sample of at most `k` items from a stream of unknown length (Vitter's R)."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.items, self.seen = k, [], 0
        self._rng = random.Random(seed)  # seeded: the same stream gives the same report

    def add(self, item) -> None:
        self.add_lazy(lambda: item)

    def add_lazy(self, make) -> bool:
        """Like add(), but builds the item (`make()`) only if it is kept: most are not."""
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(make())
            return True
        j = self._rng.randrange(self.seen)
        if j < self.k:
            self.items[j] = make()
        return j < self.k


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # peak, not current: the best that non-Linux systems offer cheaply

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssTrace:
    """RSS sampled every `every` frames; when full, every other point is dropped and the step doubles."""

    def __init__(self, every: int = 100, max_points: int = 64):
        self.every, self.max_points, self.points = every, max_points, []

    def maybe_add(self, frames: int) -> None:
        if frames % self.every:
            return
        self.points.append((frames, round(rss_mb(), 1)))
        if len(self.points) >= self.max_points:
            self.points = self.points[::2]
            self.every *= 2

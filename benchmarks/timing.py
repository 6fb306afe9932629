"""Round-robin timing with a shuffled order and a cache flush before each call.

Each :class:`Case` is timed as one call of ``run(prepare())``: ``prepare`` (not
timed) makes the arguments, e.g. a fresh copy of a donated input; the
last-level cache is then flushed by reading a buffer larger than it; ``run``
is timed from its call until its outputs are ready (``run`` itself blocks,
e.g. with ``jax.block_until_ready``).
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to time.

    Attributes:
      key: identifies the case in the results, e.g. ``(impl, shape, op)``.
      run: ``run(args)`` performs the work and returns once it is complete.
      prepare: returns the arguments of ``run``; called before the flush and
        not timed.
    """

    key: Hashable
    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache that sysfs reports (0 if it reports none)."""
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        largest = max(largest, int(digits) * factor)
    return largest


class CacheFlusher:
    """Evicts the caches by reading a buffer larger than the last-level cache.

    The pass only reads, so the lines it leaves in the cache are clean: the
    timed call that evicts them writes nothing back on the flush's behalf
    (a read-modify-write pass would charge each call for those write-backs).
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._buffer = np.ones(max(nbytes, 1), np.uint8)  # ones: pages are touched

    def __call__(self) -> None:
        """Reads the whole buffer once."""
        if self.nbytes:
            self._buffer.max()


def cache_flusher(flush_mib: int | None) -> CacheFlusher:
    """The flusher of a run: ``flush_mib`` MiB, or 1.25x the last-level cache."""
    if flush_mib is not None:
        return CacheFlusher(flush_mib << 20)
    return CacheFlusher(int(1.25 * last_level_cache_bytes()))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Order statistics of the samples of one case, in seconds."""

    median: float
    q1: float
    q3: float
    minimum: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        """The summary of ``samples`` (seconds)."""
        a = np.asarray(samples, dtype=np.float64)
        q1, median, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(a.min()), len(a))


def measure(
    cases: Sequence[Case],
    *,
    reps: int,
    warmup: int,
    flush: Callable[[], None],
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[Hashable, list[float]]:
    """Times every case ``reps`` times, round-robin, shuffling the order each rep.

    Args:
      cases: the cases; their keys must be distinct.
      reps: samples per case.
      warmup: untimed calls of each case before the first rep.
      flush: called right before each timed call.
      seed: seed of the shuffles.
      progress: called with a short message after each rep.

    Returns:
      The samples in seconds, per case key, in the order they were taken.
    """
    rng = np.random.default_rng(seed)
    samples: dict[Hashable, list[float]] = {case.key: [] for case in cases}
    for case in cases:
        for _ in range(warmup):
            case.run(case.prepare())
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            start = time.perf_counter()
            for i in rng.permutation(len(cases)):
                case = cases[i]
                args = case.prepare()
                flush()
                t0 = time.perf_counter()
                out = case.run(args)
                t1 = time.perf_counter()
                del out, args
                samples[case.key].append(t1 - t0)
            gc.collect()
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(f"rep {rep + 1}/{reps} ({elapsed:.1f} s)")
    finally:
        gc.enable()
    return samples

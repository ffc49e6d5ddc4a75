"""Timing that holds on a shared, noisy machine: one pinned thread, cases interleaved call by call, per-pair ratios.

- `pin(threads)`: this process on as many cores as threads (the first ones it may use), torch on that many threads.
- `interleaved(cases, rounds)`: every round calls every case once, the order rotated from round to round, after
  a warm-up call of each; each call is timed by the thread's CPU clock and by the wall clock.
- `ratio(base, candidate)`: for each round base time / candidate time (> 1: the candidate is faster); the median
  with the min-max over rounds. A pair of neighbouring calls shares whatever load the machine had then, so the
  ratio stays fair where separate medians would not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def benchmark_arguments(doc: str) -> argparse.Namespace:
    """--quick (few rounds: a smoke test) and --threads (default 1) of every benchmark script."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and tokens: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, pinned to as many cores")
    return parser.parse_args()


def pin(threads: int = 1) -> list[int]:
    """Run on `threads` cores (the first allowed ones) with as many torch threads; returns the cores."""
    cores = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    return cores


@dataclass
class Timing:
    cpu: list[float] = field(default_factory=list)  # seconds of this thread's CPU time per call
    wall: list[float] = field(default_factory=list)

    def median(self, clock: str = "cpu") -> float:
        return statistics.median(getattr(self, clock))


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, Timing]:
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    out = {name: Timing() for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0, w0 = time.thread_time(), time.perf_counter()
            cases[name]()
            out[name].cpu.append(time.thread_time() - c0)
            out[name].wall.append(time.perf_counter() - w0)
    return out


def ratio(base: list[float], candidate: list[float]) -> tuple[float, float, float]:
    """Per-pair base / candidate: (median, min, max)."""
    pairs = [b / c for b, c in zip(base, candidate)]
    return statistics.median(pairs), min(pairs), max(pairs)


def difference(long: Timing, short: Timing, clock: str = "cpu") -> list[float]:
    """Per-round time of the part a longer call adds to a shorter one (e.g. N decode steps after a prefill)."""
    return [max(a - b, 1e-9) for a, b in zip(getattr(long, clock), getattr(short, clock))]


def fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, rounds: int = 5) -> float:
    """FLOP/s of an n x n matmul on this thread count, best of `rounds` (the peak the MFU is measured against)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def dram_bandwidth(megabytes: int = 512, rounds: int = 5) -> float:
    """Bytes/s of reading a buffer far larger than the caches (a sum over it), best of `rounds`."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best

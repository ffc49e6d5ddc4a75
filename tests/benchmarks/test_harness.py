"""The benchmark harness: interleaving order and per-pair ratios (the numbers every benchmark prints)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness import Timing, difference, interleaved, ratio  # noqa: E402


def test_interleaving_rotates_the_order_and_times_every_call():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(cases, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated rounds
    assert all(len(t.cpu) == len(t.wall) == 3 for t in times.values())


def test_ratios_are_per_pair_medians_with_their_spread():
    base, candidate = [2.0, 4.0, 3.0], [1.0, 1.0, 3.0]  # per pair: 2, 4, 1
    assert ratio(base, candidate) == (2.0, 1.0, 4.0)
    long, short = Timing(cpu=[5.0, 7.0]), Timing(cpu=[1.0, 2.0])
    assert difference(long, short) == [4.0, 5.0]

"""Wall-clock latency of a callable: the one timing loop of every benchmark and export check.

Standard library only, so torch-free code (``runtimes``) can use it.
"""
from __future__ import annotations

import time
from typing import Callable


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 1,
               sync: Callable[[], object] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed (first calls compile kernels), then ``runs`` times;
    return each timed call's milliseconds in call order. ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs after every call so that asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - t) * 1000)
    return times

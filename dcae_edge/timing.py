"""Wall-clock latency of a callable: the one timing loop of every benchmark and export check.

Standard library only, so torch-free code (``runtimes``) can use it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
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


def time_interleaved(fns: list[Callable[[], object]], runs: int, rounds: int) -> list[list[float]]:
    """Milliseconds of each callable (warm already), taken in ``rounds`` rounds in which each one runs
    ``runs`` times in turn: on a shared machine a slow spell then hits every candidate alike, instead
    of whichever happened to be running. Returns one list of times per callable."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t += time_calls(fn, runs, 0)
    return times


def interleaved_medians(fns: list[Callable[[], object]], runs: int, rounds: int) -> list[float]:
    """Median ms of each callable (warm already) over ``time_interleaved`` rounds, rounded to µs."""
    return [round(statistics.median(t), 3) for t in time_interleaved(fns, runs, rounds)]


def run_measured(cmd: list[str], cwd=None, env=None) -> dict:
    """Run a command in its own process; its wall time and *its own* peak RSS (``os.wait4`` reports
    the one child's rusage; RUSAGE_CHILDREN would be the maximum over every child so far)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_gib": round(usage.ru_maxrss / 1024 / 1024, 2),
            "returncode": proc.returncode, "output": out}

"""Run a command and print each of its output lines with the elapsed time, the process tree's RSS
and the peak so far: where in an export the memory goes.

    python scripts/trace_rss.py python -m export.onnx --variant f64 --weights random:dc-ae-f64c128-in-1.0 \
        --out /tmp/paper --resolution 512 --denoiser none --graphs vae_decoder
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time


def tree_rss_gib(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split()) / 2**20


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    t0, now, peak = time.time(), [0.0], [0.0]

    def sample():  # every 0.5 s until the command ends
        while proc.poll() is None:
            now[0] = tree_rss_gib(proc.pid)
            peak[0] = max(peak[0], now[0])
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        print(f"[{time.time() - t0:7.1f} s  rss {now[0]:6.2f}  peak {peak[0]:6.2f} GiB] {line.rstrip()}", flush=True)
    rc = proc.wait()
    print(f"exit {rc}: {time.time() - t0:.1f} s wall, peak RSS {peak[0]:.2f} GiB")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

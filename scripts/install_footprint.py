"""Installed size and import time: the app install (`pip install dcae-edge`, no extras) next to the
toolchain install (`[export]`: torch & co.), each in a fresh virtual environment.

    python scripts/install_footprint.py --out docs/install-footprint
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6, 1)


def import_seconds(py: str, stmt: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([py, "-c", stmt], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "node_modules", ".venv", ".ci-venv", "data", "runs",
                                                                 "exports", "build", ".cache", "docs", "tests", "*.egg-info"))
        for name, spec in (("app (no extras)", str(src)), ("toolchain ([export])", f"{src}[export]")):
            env = tmp / name.split()[0]
            venv.EnvBuilder(with_pip=True).create(env)
            py = str(env / "bin" / "python")
            t = time.perf_counter()
            subprocess.run([py, "-m", "pip", "install", "-q", spec], check=True)
            install_s = round(time.perf_counter() - t, 1)
            site = next((env / "lib").glob("python*/site-packages"))
            has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
            rows.append({"install": name, "site_packages_mb": du_mb(site), "install_s": install_s, "torch": has_torch,
                         "import_runtimes_s": import_seconds(py, "from runtimes import open_bundle"),
                         "import_torch_s": import_seconds(py, "import torch") if has_torch else None})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "python": sys.version.split()[0]}, indent=1))
    from runtimes.precision import cpu_model

    lines = ["# Install footprint", "", f"`python scripts/install_footprint.py --out {args.out}` on {cpu_model()} (2 cores), "
             f"Python {sys.version.split()[0]}; import times are medians of 5 cold processes.", "",
             "| install | site-packages MB | torch | `from runtimes import open_bundle` s | `import torch` s |", "|---|---|---|---|---|"]
    lines += [f"| {r['install']} | {r['site_packages_mb']} | {'yes' if r['torch'] else 'no'} | {r['import_runtimes_s']} | "
              f"{r['import_torch_s'] if r['import_torch_s'] is not None else '—'} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

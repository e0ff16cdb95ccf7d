"""Browser benchmark (not a test): the bundle's decoder, encoder and one transformer step (CFG
batch 2) in headless Chromium (onnxruntime-web, WASM 1 and 2 threads) vs Python onnxruntime on
the same machine, as ratios.

    python scripts/bench_web.py --bundle exports/f64 --out docs/bench-web
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    from dcae_edge.timing import time_calls
    from runtimes import open_bundle
    from runtimes.precision import cpu_model, probe_inputs
    from runtimes.web.__main__ import serve_in_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    web = ROOT / "runtimes" / "web"
    if not (web / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=web, check=True)
    server, url = serve_in_thread(args.bundle)
    try:
        r = subprocess.run(["node", str(web / "test" / "bench.mjs"), url, str(args.runs)], cwd=web, capture_output=True,
                           text=True, timeout=1800, env={"PATH": "/usr/bin:/bin", "CHROMIUM": shutil.which("chromium") or ""})
    finally:
        server.shutdown()
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    browser = json.loads(r.stdout.strip().splitlines()[-1])
    pipe = open_bundle(args.bundle, "onnxruntime", "fp32", threads=2)
    m = pipe.manifest
    native = {}
    for graph in ("vae_decoder", "vae_encoder", "transformer"):
        if graph in m["graphs"]:
            feeds = probe_inputs(m, graph)
            runner = pipe._runner(graph)
            native[graph] = round(statistics.median(time_calls(lambda: runner.run(feeds), args.runs * (4 if graph == "transformer" else 1))), 1)
    rows = []
    for graph, ms in native.items():
        w1, w2 = browser["1"].get(graph), browser["2"].get(graph)
        rows.append({"graph": graph, "python_ort_ms": ms, "wasm_1t_ms": round(w1, 1) if w1 else None,
                     "wasm_2t_ms": round(w2, 1) if w2 else None, "ratio_1t": round(w1 / ms, 2) if w1 else None,
                     "ratio_2t": round(w2 / ms, 2) if w2 else None})
    report = {"cpu": cpu_model(), "bundle": str(args.bundle), "resolution": m["resolution"], "rows": rows,
              "threads_seen": {k: v["threads"] for k, v in browser.items()},
              "command": "python scripts/bench_web.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# The browser vs native onnxruntime ({m['resolution']}², fp32)", "",
             f"CPU: {report['cpu']}. Headless Debian Chromium, onnxruntime-web (WASM, SIMD; 1 and 2 threads, the page "
             "cross-origin isolated) vs Python onnxruntime with 2 threads, same machine, medians. "
             f"Command: `{report['command']}`", "",
             "| graph | Python ORT ms | WASM 1 thread ms | WASM 2 threads ms | 1 thread / native | 2 threads / native |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['graph']} | {r['python_ort_ms']} | {r['wasm_1t_ms']} | {r['wasm_2t_ms']} | {r['ratio_1t']}x | {r['ratio_2t']}x |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

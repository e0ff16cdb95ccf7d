"""Browser benchmark (not a test): the bundle's decoder, encoder and one transformer step (CFG
batch 2) at every ONNX precision it has, in headless Chromium (onnxruntime-web, WASM 1 and 2
threads) vs Python onnxruntime on the same machine, as ratios; the page's precision auto marked
(the rule of runtimes/web/lib/precision.js applied to the 2-thread timings).

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


def chart(report: dict, path: Path) -> None:
    """Grouped bars per graph: native onnxruntime and WASM (1 and 2 threads) at each precision, auto's pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    fig, axes = plt.subplots(1, len(graphs), figsize=(4.2 * len(graphs), 4))
    for ax, graph in zip(axes if len(graphs) > 1 else [axes], graphs):
        mine = [r for r in rows if r["graph"] == graph]
        for k, (key, label, color) in enumerate((("python_ort_ms", "native ORT (2 threads)", "tab:gray"),
                                                 ("wasm_1t_ms", "WASM 1 thread", "tab:orange"),
                                                 ("wasm_2t_ms", "WASM 2 threads", "tab:blue"))):
            ax.bar([i + 0.27 * (k - 1) for i in range(len(mine))], [r[key] or 0 for r in mine], 0.27, label=label, color=color)
        ax.set_xticks(range(len(mine)), [r["precision"] + ("\n(auto)" if r["auto"] else "") for r in mine])
        ax.set_title(graph, fontsize=10)
        ax.set_ylabel("median ms")
        ax.grid(axis="y", alpha=0.3)
    (axes[0] if len(graphs) > 1 else axes).legend(fontsize=8)
    fig.suptitle(f"{report['resolution']}², {report['cpu']} [{report['isa']}]; auto: the page's pick from WASM 2 threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    from dcae_edge.cli import at_least
    from dcae_edge.timing import time_calls
    from runtimes import open_bundle
    from runtimes.pipeline import read_manifest
    from runtimes.precision import choose, cpu_isa, cpu_model, gated, probe_inputs
    from runtimes.web.__main__ import serve_in_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=at_least(1), default=7)
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
    m = read_manifest(args.bundle, verify=False)
    rows = []
    pipes = {}  # one native pipeline per precision, shared by the graphs
    for graph, by_precision in browser["2"]["graphs"].items():
        # what the page's auto weighs on WASM: the gated fp32 and int8 (fp16: no fp16 arithmetic there)
        allowed = [p for p in gated(m, graph, "onnxruntime") if p in ("fp32", "int8")]
        auto, _ = choose({p: ms for p, ms in by_precision.items() if p in allowed}, allowed)
        feeds = probe_inputs(m, graph)
        for precision, w2 in by_precision.items():
            if precision not in pipes:
                pipes[precision] = open_bundle(args.bundle, "onnxruntime", precision, threads=2)
            runner = pipes[precision]._runner(graph)
            ms = round(statistics.median(time_calls(lambda: runner.run(feeds), args.runs * (4 if graph == "transformer" else 1))), 1)
            w1 = browser["1"]["graphs"].get(graph, {}).get(precision)
            rows.append({"graph": graph, "precision": precision, "auto": precision == auto, "python_ort_ms": ms,
                         "wasm_1t_ms": round(w1, 1) if w1 else None, "wasm_2t_ms": round(w2, 1),
                         "ratio_1t": round(w1 / ms, 2) if w1 else None, "ratio_2t": round(w2 / ms, 2)})
    report = {"cpu": cpu_model(), "isa": cpu_isa(), "bundle": str(args.bundle), "resolution": m["resolution"], "rows": rows,
              "threads_seen": {k: v["threads"] for k, v in browser.items()},
              "command": "python scripts/bench_web.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# The browser vs native onnxruntime ({m['resolution']}², every ONNX precision)", "",
             f"CPU: {report['cpu']} [{report['isa']}]. Headless Debian Chromium, onnxruntime-web (WASM, SIMD; 1 and 2 threads, "
             "the page cross-origin isolated) vs Python onnxruntime with 2 threads at the same precision, same machine, "
             "medians. **auto**: what the page's precision auto picks from the 2-thread timings (gated fp32 / int8; a tie "
             f"within 5% goes to the more accurate). Command: `{report['command']}`", "",
             "| graph | precision | Python ORT ms | WASM 1 thread ms | WASM 2 threads ms | 1 thread / native | 2 threads / native |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['graph']} | {r['precision']}{' **auto**' if r['auto'] else ''} | {r['python_ort_ms']} | {r['wasm_1t_ms']} | "
              f"{r['wasm_2t_ms']} | {r['ratio_1t']}x | {r['ratio_2t']}x |" for r in rows]
    chart(report, out.with_suffix(".png"))
    lines += ["", f"![browser vs native]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

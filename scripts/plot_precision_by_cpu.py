"""One picture of what precision="auto" faces: every precision of every graph on each CPU measured, from
scripts/bench_int8.py reports (a chart, not a test).

    python scripts/plot_precision_by_cpu.py docs/bench_int8-f64-avx2.json docs/bench_int8-f64.json \
        docs/bench_int8-f64-amx.json --out docs/precision-by-cpu.png

One panel per graph; per CPU a group of bars (ms at 512², 2 threads), OpenVINO and ONNX Runtime side by side,
auto's pick per backend outlined in black. A report that does not name its ISA gets it from --isa.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {("openvino", "f32"): "#9ecae1", ("openvino", "bf16"): "#3182bd", ("openvino", "int8 (+f32)"): "#fdae6b",
          ("openvino", "int8 (+bf16)"): "#e6550d", ("onnxruntime", "fp32"): "#c7e9c0", ("onnxruntime", "int8"): "#31a354"}
GRAPHS = ("vae_encoder", "vae_decoder", "transformer")


def short_isa(isa: str) -> str:
    """What decides the fastest precision, in three words (from dcae_edge.cpu's "have; no lack" wording)."""
    have = isa.split("; no ", 1)[0]
    if "AMX" in have:
        return "AMX"
    if "AVX512-BF16" in have:
        return "AVX-512 bf16, no AMX"
    return "AVX-512, no bf16" if "AVX-512" in have else "AVX2 only"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--isa", nargs="*", default=[], metavar="REPORT=ISA", help="ISA words for a report that lacks them")
    ap.add_argument("--out", type=Path, default=Path("docs/precision-by-cpu.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    isa_for = dict(a.split("=", 1) for a in args.isa)
    reports = []
    for path in args.reports:
        r = json.loads(path.read_text())
        isa = r.get("isa") or isa_for.get(str(path)) or "ISA not recorded"
        reports.append((r["cpu"].replace("(R)", "").replace(" Processor", "") + "\n" + short_isa(isa), r["rows"]))
    fig, axes = plt.subplots(1, len(GRAPHS), figsize=(6 * len(GRAPHS), 5.5))
    width = 0.8 / len(COLORS)
    for ax, graph in zip(axes, GRAPHS):
        for i, (label, rows) in enumerate(reports):
            timed = {(r["backend"], r["precision"]): r for r in rows if r["graph"] == graph and "median_ms" in r}
            for j, key in enumerate(COLORS):
                row = timed.get(key)
                if row is None:
                    continue
                ax.bar(i + (j - len(COLORS) / 2 + 0.5) * width, row["median_ms"], width, color=COLORS[key],
                       edgecolor="black" if row.get("auto") else "none", linewidth=1.8 if row.get("auto") else 0)
        ax.set_xticks(range(len(reports)), [label for label, _ in reports], fontsize=8)
        ax.set_title(f"{graph} (512², 2 threads; outlined: auto's pick)", fontsize=9)
        ax.set_ylabel("median ms (log)")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    legend = [Patch(color=c, label=f"{b} {p}") for (b, p), c in COLORS.items()]
    legend.append(Patch(facecolor="white", edgecolor="black", linewidth=1.8, label="auto's pick"))
    fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

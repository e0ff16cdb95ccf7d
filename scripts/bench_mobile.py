"""Phone-runtime memory benchmark (not a test): artifact size and peak RSS of one decode through the
ORT-format runtime (.ort) and ExecuTorch (.pte), per precision, at 512² and tiled 1024², 2048², 4096².

    python scripts/bench_mobile.py --bundle exports/f64 --out docs/bench-mobile
    python scripts/bench_mobile.py --bundle /tmp/paper --resolutions 512 2048 --formats onnx --out docs/bench-tiled-f64c128-paper

Each configuration runs in its own process (numpy + the runtime only); its peak RSS comes from
os.wait4, and the same process with nothing loaded gives the base (interpreter + runtime library).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcae_edge.timing import run_measured  # noqa: E402

CHILD = """
import json, sys, time, numpy as np
bundle, fmt, precision, res, load_only = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
if fmt == "pte":
    import executorch.runtime  # noqa: F401  (the runtime library counts in the base)
else:
    import onnxruntime  # noqa: F401
from runtimes import open_bundle
kw = {"backend": "executorch"} if fmt == "pte" else {"format": fmt}
pipe = open_bundle(bundle, precision=precision, **kw)
m = pipe.manifest
f, c = m["autoencoder"]["spatial_compression"], m["autoencoder"]["config"]["latent_channels"]
if load_only:
    print(json.dumps({})); sys.exit()
z = np.random.default_rng(0).standard_normal((1, c, res // f, res // f)).astype(np.float32)
t = time.perf_counter()
x = pipe.decode(z, tile=m["resolution"] if res > m["resolution"] else None)
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "shape": list(x.shape)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--formats", nargs="+", default=["ort", "pte"])
    args = ap.parse_args()
    from dcae_edge.cpu import cpu_isa
    from runtimes.precision import cpu_model

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    arts = manifest["graphs"]["vae_decoder"]["artifacts"]
    rows = []
    for fmt in args.formats:
        for precision in ("fp32", "fp16", "int8"):
            key = f"{fmt}/{precision}"
            if key not in arts:
                continue
            size_mb = sum(manifest["files"][f]["bytes"] for f in arts[key]["files"]) / 1e6
            base = run_measured([sys.executable, "-c", CHILD, str(args.bundle), fmt, precision, "512", "1"], cwd=ROOT)
            for res in args.resolutions:
                r = run_measured([sys.executable, "-c", CHILD, str(args.bundle), fmt, precision, str(res), "0"], cwd=ROOT)
                ok = r["returncode"] == 0
                info = json.loads(r["output"].strip().splitlines()[-1]) if ok else {}
                row = {"format": fmt, "precision": precision, "artifact_mb": round(size_mb, 1), "resolution": res,
                       "tiled": res > manifest["resolution"], "peak_rss_mb": round(r["peak_rss_gib"] * 1024, 1),
                       "base_rss_mb": round(base["peak_rss_gib"] * 1024, 1), "seconds": info.get("seconds"),
                       "error": None if ok else r["output"].strip().splitlines()[-1][:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"cpu": f"{cpu_model()} ({cpu_isa()})", "bundle": str(args.bundle), "decoder": manifest["autoencoder"]["name"],
              "bundle_resolution": manifest["resolution"], "rows": rows,
              "command": "python scripts/bench_mobile.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    phone = set(args.formats) <= {"ort", "pte"}
    lines = [f"# Decoder memory through the {'phone ' if phone else ''}runtimes ({report['decoder']})", "",
             f"CPU: {report['cpu']}" + (" (the same runtimes as on a phone, built for x86: memory, not speed, carries over). "
                                         if phone else ". ") +
             f"Bundle resolution {report['bundle_resolution']}²: larger images decode in overlapping tiles of it. "
             f"Command: `{report['command']}`", "",
             "| runtime | precision | artifact MB | image | peak RSS MB | runtime alone MB | decode s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = {"ort": "ORT format (.ort)", "pte": "ExecuTorch (.pte, XNNPACK)", "onnx": "ONNX Runtime (.onnx)"}.get(r["format"], r["format"])
        img = f"{r['resolution']}²" + (" tiled" if r["tiled"] else "")
        lines.append(f"| {name} | {r['precision']} | {r['artifact_mb']} | {img} | "
                     f"{r['peak_rss_mb'] if not r['error'] else 'error: ' + r['error']} | {r['base_rss_mb']} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

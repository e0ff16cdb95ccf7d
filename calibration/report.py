"""The quality report written next to the INT8 artifacts: DIR/calibration/<backend>.json (all
numbers), .md (tables for people) and .png (held-out photos, fp32 and INT8 reconstructions and
their amplified difference)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.bundle import fresh

from .quality import describe_e2e, describe_gate

STRIP_PHOTOS = 4
DIFF_GAIN = 10
ROUND_NOTES = {"measured": " (measured order)", "trim": " (trimmed)", "latency": " (with the ops INT8 does not speed up here)"}


def _details(backend, results, calib, held) -> dict:
    return {g: {"artifact": backend.key, "calibration_set": calib[g].to_manifest(), "held_out_set": held[g].to_manifest(),
                "gate": o.gate, "counts": o.attempt.counts, "seconds": o.seconds, "mode": o.mode,
                "kept_in_float": [c.to_dict() for c in o.excluded],
                "most_sensitive": [c.to_dict() for c in o.ranking[:20]],
                "rounds": [{"round": r["round"], "nodes_in_float": r["excluded"], "value": r["gate"]["value"],
                            "pass": r["gate"]["pass"], "seconds": r["seconds"]} for r in o.rounds],
                "layer_latency": o.attempt.extra.get("layer_latency", []),
                "kept_float_for_speed": o.attempt.extra.get("kept_float_for_speed", []),
                "int8_faster_nowhere": bool(o.attempt.extra.get("int8_faster_nowhere")),
                "latency_check": o.attempt.extra.get("latency_check"),
                "validation_bf16": o.attempt.extra.get("validation_bf16"),
                "versus_float": o.attempt.extra.get("versus_float")}
            for g, o in results.items()}


def _markdown(backend, summary: dict, details: dict, png: str | None) -> str:
    lines = [f"# INT8 calibration: {backend.name}", "",
             f"Artifact `{backend.key}`; settings: " + ", ".join(f"{k} {v}" for k, v in summary["settings"].items()), "",
             f"Calibrated on {summary.get('cpu', 'a CPU not recorded')}: what the latency pass kept in float is this CPU's "
             "choice" + ("; the gates hold on any CPU (7-bit weights cannot saturate)." if summary["settings"].get("weight_bits") == 7
                         else "."), "",
             "## Gates (held-out data, INT8 vs the same backend's fp32)", "",
             "| graph | metric | value | threshold | pass |", "|---|---|---|---|---|"]
    for g, d in details.items():
        gate = d["gate"]
        lines.append(f"| {g} | {gate['metric']} | {gate['value']:.4f} | {gate['threshold']} | {'yes' if gate['pass'] else 'NO'} |")
    for g, why in summary.get("graphs_left_out", {}).items():
        lines.append(f"| {g} | left out (--skip-failed-graphs) | {why} | | NO |")
    e2e = summary["gates"].get("end_to_end")
    if e2e:
        lines.append(f"| end to end ({' + '.join(e2e['int8_graphs'])} INT8) | PSNR drop vs photos (dB) | {e2e['value']:.3f} "
                     f"| <= {e2e['threshold']} | {'yes' if e2e['pass'] else 'NO'} |")
        lines += ["", describe_e2e(e2e)]
    for g, d in details.items():
        lines += ["", f"## {g}", "", f"- {describe_gate(g, d['gate'])}",
                  f"- calibration set: {d['calibration_set']['size']} feeds, {d['calibration_set']['hash']}, "
                  f"{d['calibration_set']['source']}",
                  f"- held-out set: {d['held_out_set']['size']} feeds, {d['held_out_set']['source']}",
                  f"- INT8 content: {backend.describe_counts(d['counts'])}",
                  *([f"- with the float remainder in bf16 (precision `int8-bf16`): "
                     + (d["validation_bf16"].get("gate") or "") + (" (pass)" if d["validation_bf16"].get("pass") else
                                                                     f" ({d['validation_bf16'].get('skipped') or 'FAIL: not offered'})")]
                    if d.get("validation_bf16") else []),
                  f"- {d['mode']}: {len(d['rounds']) - 1} rounds, {d['seconds']} s: "
                  + ", ".join(f"{r['nodes_in_float']} in float" + ROUND_NOTES.get(str(r["round"]).split()[0], "")
                              + f" -> {r['value']:.4f}" for r in d["rounds"])]
        vs = d.get("versus_float")
        if vs and "skipped" not in vs:
            lines.append(f"- end to end on this CPU: INT8 {vs['int8_ms']} ms vs {vs['float']} {vs['float_ms']} ms "
                         f"({vs['verdict']})")
        elif vs:
            lines.append(f"- end to end on this CPU: not timed ({vs['skipped']})")
        if d["kept_in_float"]:
            lines += ["", "Kept in float (most damaging first):", "", "| node | op | weight / role | why |", "|---|---|---|---|"]
            lines += [f"| `{c['node']}` | {c['op_type']} | `{c['label']}` | {c['reason']} |" for c in d["kept_in_float"]]
        elif d["most_sensitive"]:
            lines += ["", "Nothing kept in float. Most sensitive nodes (lowest SQNR):", ""]
            lines += [f"- `{c['node']}` ({c['op_type']}, `{c['label']}`): {c['reason']}" for c in d["most_sensitive"][:5]]
        if d.get("layer_latency"):
            rows = d["layer_latency"]
            other = next(k for k in rows[0] if k.endswith("_ms") and k != "int8_ms")
            int8_total = sum(r["int8_ms"] if r["int8"] else r[other] for r in rows)
            lines += ["", f"Latency on this CPU, per quantized op (INT8 node vs the float graph at {other[:-3]}): "
                      f"{sum(not r['int8'] for r in rows)} of {len(rows)} kept in float because INT8 was no faster; these "
                      f"ops take {sum(r[other] for r in rows):.1f} ms in {other[:-3]} and {int8_total:.1f} ms in the mix.", "",
                      f"| op | INT8 ms | {other[:-3]} ms | runs in |", "|---|---|---|---|"]
            lines += [f"| `{r['node']}` | {r['int8_ms']} | {r[other]} | {'INT8' if r['int8'] else other[:-3]} |" for r in rows]
            check = d.get("latency_check")
            if check:
                kept = "kept" if d.get("kept_float_for_speed") else "not kept: the accuracy-chosen INT8 graph stays"
                if check.get("tie"):
                    kept += f" ({check['tie']})"
                lines += ["", f"End to end at {check['hint']} (interleaved medians): the mix {check['mix_ms']} ms vs "
                          f"{check['accuracy_chosen_ms']} ms for the accuracy-chosen INT8 graph; the mix is {kept}."]
            if d.get("int8_faster_nowhere"):
                lines += ["", f"No op was faster in INT8 than in {other[:-3]} on this CPU: the INT8 graph is kept for its "
                          "size (int8 weights), and float is the faster choice here."]
    if png:
        lines += ["", "## Reconstructions", "", f"Rows: held-out photo, fp32, INT8, |INT8 - fp32| x {DIFF_GAIN}.", "",
                  f"![fp32 vs INT8]({Path(png).name})"]
    return "\n".join(lines) + "\n"


def _strip(images: dict, path: Path) -> None:
    import torch

    from dcae_edge.training_utils import save_image_grid

    n = min(STRIP_PHOTOS, len(images["photos"]))
    photo, f32, i8 = (torch.from_numpy(np.asarray(images[k][:n], dtype=np.float32)) for k in ("photos", "fp32", "int8"))
    diff = ((i8 - f32).abs() * DIFF_GAIN).clamp(0, 1) * 2 - 1
    save_image_grid([photo, f32, i8, diff], fresh(path), labels=["photo", "fp32", "INT8", f"|diff| x{DIFF_GAIN}"])


def write_reports(stage: Path, backend, results: dict, calib: dict, held: dict, summary: dict, images: dict | None) -> dict:
    folder = stage / "calibration"
    folder.mkdir(exist_ok=True)
    base = folder / backend.name
    png = None
    if images is not None:
        png = base.with_suffix(".png")
        _strip(images, png)
    details = _details(backend, results, calib, held)
    fresh(base.with_suffix(".json")).write_text(json.dumps({**summary, "details": details}, indent=1, default=str))
    fresh(base.with_suffix(".md")).write_text(_markdown(backend, summary, details, png))
    rel = lambda p: p.relative_to(stage).as_posix()  # noqa: E731
    return {"json": rel(base.with_suffix(".json")), "md": rel(base.with_suffix(".md")), **({"png": rel(png)} if png else {})}

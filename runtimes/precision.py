"""precision="auto": per graph, the fastest artifact of the chosen backend that passed its quality
gate, measured on *this* CPU (the best choice differs: bf16 wins on AMX Xeons, INT8 on AVX-512
VNNI EPYCs, and it differs per model width).

The probe runs each gated candidate a few times on inputs of the bundle's shape; the result is
cached per CPU model, ISA and bundle (``~/.cache/dcae-edge/precision/``), so it happens once. Results
recorded in the bundle by ``scripts/bench_int8.py`` for this same CPU are used instead when present.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from dcae_edge.cpu import VNNI_FLAGS, cpu_flags, cpu_isa, cpu_key, cpu_model  # noqa: F401 - re-exported

# OpenVINO's runtime precisions are (IR, INFERENCE_PRECISION_HINT) pairs: which IR files each reads (in order
# of preference), the hint it compiles them with, and whose quality gates judge it (the INT8 IR is judged by
# the INT8 gates whatever its float remainder runs at). Pipeline, parity, semantic parity and the
# benchmarks all read this one table.
OPENVINO_PRECISIONS = {"fp32": (("fp32", "fp16w"), "f32", "fp32"),
                       "bf16": (("fp32", "fp16w"), "bf16", "bf16"),
                       "int8": (("int8",), "f32", "int8"),
                       "int8-bf16": (("int8",), "bf16", "int8")}


def openvino_artifacts(precision: str) -> list[str]:
    """Artifact keys an OpenVINO precision can load, preferred first (unknown precisions: their own IR)."""
    irs = OPENVINO_PRECISIONS.get(precision, ((precision,),))[0]
    return [f"openvino/{ir}" for ir in irs]


def openvino_precisions(ir: str) -> tuple[str, ...]:
    """The runtime precisions that run one OpenVINO IR (fp32 -> fp32 and bf16; int8 -> int8 and int8-bf16)."""
    return tuple(p for p, (irs, _, _) in OPENVINO_PRECISIONS.items() if ir in irs) or (ir,)


def gate_family(precision: str) -> str:
    """Which tolerances judge a precision: int8-bf16 is held to the INT8 gates, the rest to their own."""
    return OPENVINO_PRECISIONS.get(precision, (None, None, precision))[2]


def openvino_hint(precision: str) -> str:
    """INFERENCE_PRECISION_HINT for a runtime precision: bf16 runs the fp32 IR's float ops in bf16,
    int8-bf16 the INT8 IR's float remainder; everything else runs f32 (exact parity)."""
    return OPENVINO_PRECISIONS.get(precision, (None, "f32"))[1]


# per backend, the precisions that can stand for a graph and the artifact keys that carry them
CANDIDATES = {"onnxruntime": ("fp32", "fp16", "int8"), "openvino": tuple(OPENVINO_PRECISIONS),
              "executorch": ("fp32", "int8"), "coreml": ("fp16", "int8", "fp32"), "torch": ("fp32",)}
GATE_KEYS = {"onnxruntime": {"fp32": "onnx/fp32", "fp16": "onnx/fp16", "int8": "onnx/int8"},
             "openvino": {p: openvino_artifacts(p)[0] for p in OPENVINO_PRECISIONS},
             "executorch": {"fp32": "pte/fp32", "int8": "pte/int8"},
             "coreml": {"fp16": "coreml/fp16", "int8": "coreml/int8w", "fp32": "coreml/fp32"}}
# precisions only OpenVINO runs (an error elsewhere, not a silent fallback)
OPENVINO_ONLY = tuple(p for p in CANDIDATES["openvino"] if not any(p in c for b, c in CANDIDATES.items() if b != "openvino"))


# the calibrated graph each backend's int8 runs (ExecuTorch's XNNPACK kernels widen to 16 bits before adding: no risk)
INT8_SOURCES = {b: GATE_KEYS[b]["int8"] for b in ("onnxruntime", "openvino")}


def int8_saturation_risk(manifest: dict, graph: str, backend: str = "onnxruntime", flags: set[str] | None = None,
                         machine: str | None = None) -> str | None:
    """Why the bundle's INT8 graph for ``backend`` may compute wrong values on this CPU, or None: full 8-bit
    weights on an x86 CPU without VNNI, whose u8 x s8 kernels add two products in 16 bits and saturate.
    Calibration writes 7-bit weights since 2026-12-03 (``weight_bits`` in the artifact's settings); older
    bundles hold 8-bit ones (NNCF's default overflow fix covered only the first layer)."""
    art = manifest["graphs"].get(graph, {}).get("artifacts", {}).get(INT8_SOURCES.get(backend, ""))
    if art is None or int((art.get("settings") or {}).get("weight_bits", 8)) <= 7:
        return None
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is not None and flags & VNNI_FLAGS:
        return None
    return (f"{graph}'s {backend} INT8 graph has full 8-bit weights and this CPU ({cpu_model()}) has no VNNI: its u8 x s8 "
            "kernels saturate there (an ONNX Runtime encoder calibrated on a VNNI CPU reached cosine 0.965 vs fp32 on an "
            f"AVX2 one); re-calibrate with this version (7-bit weights): python -m calibration --bundle <bundle> --backend {backend}")


def _openvino_bf16() -> bool:
    from .backends import RuntimeUnavailable, openvino_runs_bf16

    try:
        return openvino_runs_bf16()
    except RuntimeUnavailable:  # no OpenVINO here: nothing of it is loaded anyway
        return True


def gated(manifest: dict, graph: str, backend: str, fmt: str = "onnx") -> list[str]:
    """Precisions whose artifact exists and passed its check (export validation or INT8 gate)."""
    arts = manifest["graphs"].get(graph, {}).get("artifacts", {})
    out = []
    for precision in CANDIDATES.get(backend, ("fp32",)):
        key = GATE_KEYS.get(backend, {}).get(precision)
        if backend == "onnxruntime" and fmt != "onnx":
            key = f"{fmt}/{precision}"
        if key is None or key not in arts:
            continue
        if precision.startswith("int8") and int8_saturation_risk(manifest, graph, backend):
            continue  # its gate was measured on a CPU that does not saturate; this one does
        if backend == "openvino" and openvino_hint(precision) == "bf16" and not _openvino_bf16():
            continue  # no native bf16 here: the plugin would run the f32 precision again under another name
        art = arts[key]
        if precision == "int8-bf16":  # the INT8 gate with f32 remainder, and again with bf16 (calibration runs both)
            bf16 = art.get("validation_bf16")
            ok = bool((art.get("validation") or {}).get("pass")) and bf16 is not None and bool(bf16.get("pass"))
        elif precision == "bf16":  # the fp32 IR run at bf16: its own check (skipped: this CPU ran it in f32)
            check = art.get("validation_bf16") or {}
            ok = bool(check.get("pass")) or check.get("skipped") is not None
        else:
            ok = bool((art.get("validation") or {}).get("pass", precision == "fp32"))
        if ok:
            out.append(precision)
    return out


# most accurate first: a lossier artifact must beat a more accurate one by more than AUTO_TIE to be picked
ACCURACY_ORDER = ("fp32", "fp16", "bf16", "int8", "int8-bf16")
AUTO_TIE = 0.05  # timings closer than this are a tie on a shared machine (the calibration's latency pass uses it too)


def choose(timings: dict[str, float], allowed: list[str]) -> tuple[str, str]:
    """(precision, why) for one graph: the fastest allowed one, unless a more accurate one is level with it
    within AUTO_TIE (on an AVX2 EPYC the ONNX Runtime INT8 encoder timed 126.4 vs 126.7 ms in fp32: a
    lossy graph for nothing)."""
    usable = {p: t for p, t in timings.items() if p in allowed and t is not None}
    if not usable:
        return "fp32", "no gated artifact could be timed: fp32"
    fastest = min(usable, key=usable.get)
    rank = lambda p: ACCURACY_ORDER.index(p) if p in ACCURACY_ORDER else len(ACCURACY_ORDER)  # noqa: E731
    best = min((p for p, t in usable.items() if t <= usable[fastest] * (1 + AUTO_TIE)), key=rank)
    others = ", ".join(f"{p} {t:.1f} ms" for p, t in sorted(usable.items(), key=lambda kv: kv[1]) if p != best)
    untimed = [p for p in allowed if p in timings and timings[p] is None]
    why = f"{best} {usable[best]:.1f} ms" + (f" (vs {others})" if others else
                                             f" ({', '.join(untimed)} could not be timed)" if untimed else " (the only gated one)")
    if best != fastest:
        why += f"; level with {fastest} within {AUTO_TIE:.0%}, and more accurate"
    return best, why


# benchmark row labels -> the precision auto would load ("int8 (+f32)": OpenVINO INT8 with f32 for the rest)
AUTO_NAMES = {"fp32": "fp32", "f32": "fp32", "bf16": "bf16", "int8": "int8", "int8 (+f32)": "int8", "fp16": "fp16",
              "int8 (+bf16)": "int8-bf16", "int8-bf16": "int8-bf16"}


def probe_batch(graph: str) -> int:
    """The batch auto probes at (and benchmarks mark): one image, or the CFG pair for the denoiser."""
    return 2 if graph == "transformer" else 1


def mark_auto(rows: list[dict], manifest: dict, ms_key: str = "median_ms") -> dict:
    """What precision="auto" picks per graph and backend from a benchmark's rows (its own rule: the
    fastest gated artifact, at the probe batch); the chosen rows get ``auto: True``. Baseline rows and
    other batches are ignored. Returns {backend: {graph: {precision: ms}}}, the form stored in bundles."""
    eligible = [r for r in rows if r.get(ms_key) is not None and r["precision"] in AUTO_NAMES and not r.get("baseline")
                and r.get("batch", probe_batch(r["graph"])) == probe_batch(r["graph"])]
    timings: dict = {}
    for r in eligible:
        cur = timings.setdefault(r["backend"], {}).setdefault(r["graph"], {})
        p = AUTO_NAMES[r["precision"]]
        cur[p] = min(cur.get(p, float("inf")), r[ms_key])  # two rows of one precision: auto runs the faster
    for backend, graphs in timings.items():
        for graph, t in graphs.items():
            best, why = choose(t, gated(manifest, graph, backend))
            for r in eligible:
                if (r["graph"], r["backend"], AUTO_NAMES[r["precision"]], r[ms_key]) == (graph, backend, best, t[best]):
                    r["auto"] = True
            print(f"  auto: {graph} on {backend} -> {why}")
    return timings


def cache_path(manifest: dict, backend: str, fmt: str, threads: int | None) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcae-edge" / "precision"
    files = json.dumps(manifest.get("files", {}), sort_keys=True)
    key = hashlib.sha256(f"{cpu_key()}|{backend}|{fmt}|{threads}|{files}".encode()).hexdigest()[:20]
    return base / f"{key}.json"


def probe_inputs(manifest: dict, graph: str) -> dict[str, np.ndarray]:
    """Inputs of the bundle's shape (values do not matter for timing; finite and plausible)."""
    res = int(manifest["resolution"])
    f = int(manifest["autoencoder"]["spatial_compression"])
    rng = np.random.default_rng(0)
    if graph == "vae_encoder":
        return {"sample": rng.uniform(-1, 1, (1, 3, res, res)).astype(np.float32)}
    if graph == "vae_decoder":
        c = int(manifest["autoencoder"]["config"]["latent_channels"])
        return {"latent_sample": rng.standard_normal((1, c, res // f, res // f)).astype(np.float32)}
    cfg = manifest["denoiser"]["config"]
    return {"hidden_states": rng.standard_normal((2, cfg["in_channels"], cfg["input_size"], cfg["input_size"])).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32), "class_labels": np.array([0, cfg["num_classes"]], np.int64)}


def probe(pipe_factory, manifest: dict, graph: str, precisions: list[str], runs: int = 3) -> dict[str, float]:
    """Median ms per precision; ``pipe_factory(precision)`` -> a Pipeline fixed to it."""
    feeds = probe_inputs(manifest, graph)
    out = {}
    for p in precisions:
        try:
            runner = pipe_factory(p)._runner(graph)
            runner.run(feeds)  # warm-up: first calls compile kernels
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                runner.run(feeds)
                times.append((time.perf_counter() - t) * 1000)
            out[p] = round(statistics.median(times), 2)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is not a candidate
            out[p] = None
            print(f"  precision auto: {graph} {p} cannot run here ({type(e).__name__}); skipped")
    return out


def usable_timings(entry) -> dict[str, float | None]:
    """{precision: ms} from a stored benchmark or the probe cache, keeping only what a probe could have written:
    a positive finite time, or None (could not be timed). Anything else (a hand edit, another version's form) is
    dropped, so that precision is probed again instead of crashing the app or deciding on garbage."""
    if not isinstance(entry, dict):
        return {}
    keep = {}
    for p, v in entry.items():
        if v is None:
            keep[p] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            keep[p] = float(v)
    return keep


def read_cache(path: Path) -> dict:
    """The probe cache of one bundle on this CPU: {graph: {precision: ms}}; an unreadable file counts as empty
    (probed again and rewritten), with a notice."""
    if not path.is_file():
        return {}
    try:
        cached = json.loads(path.read_text())
        why = None if isinstance(cached, dict) else f"a JSON {type(cached).__name__}, not an object"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = type(e).__name__
    if why:
        print(f"precision auto: ignoring the unreadable probe cache {path} ({why}); probing again", flush=True)
        return {}
    return {g: usable_timings(t) for g, t in cached.items()}


def recorded_timings(manifest: dict, graph: str, backend: str) -> dict[str, float] | None:
    """Timings stored in the bundle by scripts/bench_int8.py, when made on this CPU model and ISA (cpu_key)."""
    rec = usable_timings((manifest.get("benchmarks") or {}).get(cpu_key(), {}).get(backend, {}).get(graph))
    return rec or None


def resolve(manifest: dict, graph: str, backend: str, fmt: str, threads: int | None, pipe_factory,
            verbose: bool = True) -> tuple[str, str]:
    allowed = gated(manifest, graph, backend, fmt)
    risk = int8_saturation_risk(manifest, graph, backend)
    if risk and verbose:
        print(f"precision auto: not int8: {risk}", flush=True)
    if len(allowed) <= 1:
        p = allowed[0] if allowed else "fp32"
        return p, f"{p} (the only gated {backend} artifact)"
    timings = recorded_timings(manifest, graph, backend)
    source = "benchmark stored in the bundle"
    if timings is None:
        path = cache_path(manifest, backend, fmt, threads)
        cached = read_cache(path)
        timings = cached.get(graph)
        source = "cached probe"
        # probe what is not timed yet (all of it the first time; a candidate a newer version added later)
        missing = [p for p in allowed if p not in (timings or {})]
        if missing:
            timings = {**(timings or {}), **probe(pipe_factory, manifest, graph, missing)}
            cached[graph] = timings
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cached, indent=1))
                tmp.replace(path)
            except OSError:
                pass  # a read-only home: probe again next time
            source = "probe on this CPU"
    precision, why = choose(timings, allowed)
    if verbose:
        print(f"precision auto: {graph} -> {backend} {why}; {source} ({cpu_key()})", flush=True)
    return precision, why

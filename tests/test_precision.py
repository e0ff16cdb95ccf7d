"""precision="auto": the fastest artifact that passed its gate, from a probe on this CPU (cached),
or from timings stored in the bundle; never a graph whose gate failed."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import make_model, tiny_edge_f64

from runtimes import precision as P


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """These tests pick between injected timings: the CPU running them need not have bf16 (AVX2 machines
    have none, and auto then leaves OpenVINO's bf16 precisions out; tested on its own below)."""
    monkeypatch.setattr(P, "_openvino_bf16", lambda: True)


def manifest_with(gates: dict[str, bool], backend: str = "onnxruntime") -> dict:
    arts = {}
    for prec, ok in gates.items():
        key = P.GATE_KEYS[backend][prec]
        if prec == "bf16":
            arts.setdefault(key, {"validation": {"pass": True}})["validation_bf16"] = {"pass": ok}
        else:
            arts[key] = {"validation": {"pass": ok}}
    for key in set(P.INT8_SOURCES.values()) & set(arts):
        arts[key]["settings"] = {"weight_bits": 7}  # as calibration writes them (no saturation anywhere)
    return {"graphs": {"vae_decoder": {"artifacts": arts}}}


def test_full_range_int8_is_not_picked_where_it_saturates(monkeypatch, capsys):
    """An INT8 graph with 8-bit weights (older bundles) is left out on an x86 CPU without VNNI, whose u8 x s8
    kernels saturate; kept with VNNI, on ARM, and with the 7-bit weights calibration writes now."""
    m = manifest_with({"fp32": True, "int8": True})
    old = json.loads(json.dumps(m))
    old["graphs"]["vae_decoder"]["artifacts"]["onnx/int8"]["settings"] = {"weights": "QInt8 per-channel"}
    avx2, vnni = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}
    risk = lambda manifest, flags, machine="x86_64": P.int8_saturation_risk(manifest, "vae_decoder", "onnxruntime", flags, machine)  # noqa: E731
    assert "no VNNI" in risk(old, avx2)
    assert risk(old, vnni) is None and risk(old, {"avx_vnni", "avx2"}) is None  # Alder Lake and later: AVX-VNNI
    assert risk(old, set(), "aarch64") is None and risk(m, avx2) is None
    # the benchmarks and calibration reports name the ISA next to every number
    assert P.cpu_isa(avx2 | {"sse2"}) == "AVX2; no AVX-512, VNNI, bf16 or AMX"
    assert P.cpu_isa(vnni | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}) == "AVX2, AVX-512, AVX512-VNNI, AVX512-BF16, AMX"
    assert "dot product" in P.cpu_isa({"fp", "asimd", "asimddp"})

    monkeypatch.setattr(P, "cpu_flags", lambda: avx2)
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    assert P.gated(old, "vae_decoder", "onnxruntime") == ["fp32"]
    assert P.gated(m, "vae_decoder", "onnxruntime") == ["fp32", "int8"]
    assert P.resolve(old, "vae_decoder", "onnxruntime", "onnx", 2, None)[0] == "fp32"
    assert "not int8" in capsys.readouterr().out
    monkeypatch.setattr(P, "cpu_flags", lambda: vnni)
    assert P.gated(old, "vae_decoder", "onnxruntime") == ["fp32", "int8"]
    ov = manifest_with({"fp32": True, "int8": True}, "openvino")
    ov["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]["settings"] = {}  # NNCF before 2026-12-03: not recorded
    monkeypatch.setattr(P, "cpu_flags", lambda: avx2)
    assert P.gated(ov, "vae_decoder", "openvino") == ["fp32"]
    ov["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]["settings"] = {"weight_bits": 7}
    assert P.gated(ov, "vae_decoder", "openvino") == ["fp32", "int8"]


def test_a_onednn_isa_cap_takes_its_flags_away_and_names_itself_in_the_cpu_key(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 runs an AMX Xeon's OpenVINO on AVX-512 kernels: auto must not time or cache
    that process under the full CPU's key, nor count on flags the capped kernels do not use."""
    from dcae_edge import cpu

    amx = "flags : fpu sse2 avx2 avx_vnni avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8"
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("model name : Intel(R) Xeon(R) Processor", amx))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    full = cpu.cpu_key()
    assert "AMX" in full and "capped" not in full and cpu.has_fast_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
    assert cpu.cpu_key() != full and cpu.cpu_isa().endswith("; no AMX; oneDNN capped at AVX512_CORE_BF16")
    assert cpu.has_fast_bf16()  # AVX512-BF16 still
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx2"} and not cpu.has_fast_bf16()
    assert cpu.cpu_isa() == "AVX2; no AVX-512, VNNI, bf16 or AMX; oneDNN capped at AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # oneDNN's own "no cap", like an unknown value
    assert cpu.cpu_key() == full


def test_fastest_gated_artifact_is_picked_from_injected_timings():
    m = manifest_with({"fp32": True, "fp16": True, "int8": True})
    allowed = P.gated(m, "vae_decoder", "onnxruntime")
    assert allowed == ["fp32", "fp16", "int8"]
    assert P.choose({"fp32": 100.0, "fp16": 80.0, "int8": 40.0}, allowed)[0] == "int8"
    assert P.choose({"fp32": 100.0, "fp16": 80.0, "int8": 140.0}, allowed)[0] == "fp16"  # INT8 slower here: not picked
    # level within timing noise: the more accurate artifact, said
    best, why = P.choose({"fp32": 126.7, "fp16": 150.0, "int8": 126.4}, allowed)
    assert best == "fp32" and "level with int8 within 5%, and more accurate" in why
    assert P.choose({"fp32": 126.7, "int8": 110.0}, allowed)[0] == "int8"
    best, why = P.choose({"fp32": 10.0, "int8": None}, allowed)
    assert best == "fp32" and "10.0 ms" in why


def test_a_graph_whose_gate_failed_is_never_picked():
    m = manifest_with({"fp32": True, "int8": False})
    allowed = P.gated(m, "vae_decoder", "onnxruntime")
    assert allowed == ["fp32"]
    assert P.choose({"fp32": 100.0, "int8": 1.0}, allowed)[0] == "fp32"
    ov = manifest_with({"fp32": True, "bf16": False, "int8": True}, "openvino")
    assert P.gated(ov, "vae_decoder", "openvino") == ["fp32", "int8"]


def test_int8_with_bf16_remainder_needs_both_gates():
    """OpenVINO "int8-bf16" (the INT8 IR run with the bf16 hint) is a candidate only when the INT8
    gate passed and calibration's second run of it, with the float remainder in bf16, passed too."""
    def ov(int8_ok, bf16_check):
        art = {"validation": {"pass": int8_ok}, "settings": {"weight_bits": 7}}
        if bf16_check is not None:
            art["validation_bf16"] = bf16_check
        return {"graphs": {"vae_decoder": {"artifacts": {"openvino/fp32": {"validation": {"pass": True},
                                                                             "validation_bf16": {"pass": True}},
                                                            "openvino/int8": art}}}}

    assert P.gated(ov(True, {"pass": True}), "vae_decoder", "openvino") == ["fp32", "bf16", "int8", "int8-bf16"]
    assert P.gated(ov(True, {"pass": False}), "vae_decoder", "openvino") == ["fp32", "bf16", "int8"]
    assert P.gated(ov(True, None), "vae_decoder", "openvino") == ["fp32", "bf16", "int8"]  # calibrated before it existed
    assert P.gated(ov(True, {"skipped": "no native bf16"}), "vae_decoder", "openvino") == ["fp32", "bf16", "int8"]
    assert P.gated(ov(False, {"pass": True}), "vae_decoder", "openvino") == ["fp32", "bf16"]
    allowed = P.gated(ov(True, {"pass": True}), "vae_decoder", "openvino")
    assert P.choose({"fp32": 129.0, "bf16": 66.0, "int8": 60.0, "int8-bf16": 51.0}, allowed)[0] == "int8-bf16"
    rows = [{"graph": "vae_decoder", "backend": "openvino", "precision": p, "batch": 1, "p50_ms": ms}
            for p, ms in (("bf16", 66.0), ("int8 (+f32)", 60.0), ("int8 (+bf16)", 51.0))]
    P.mark_auto(rows, ov(True, {"pass": False}), "p50_ms")  # its bf16 gate failed: the plain INT8 row is auto's
    assert [r["precision"] for r in rows if r.get("auto")] == ["int8 (+f32)"]


def test_every_openvino_precision_is_run_judged_and_benchmarked_from_one_table(tmp_path):
    """Which IR an OpenVINO precision reads, at which hint, under which gates: the pipeline, parity,
    semantic parity and runtimes.bench all take it from precision.OPENVINO_PRECISIONS."""
    from runtimes.bench import bundle_configs
    from runtimes.parity import combos, tolerance

    assert P.OPENVINO_ONLY == ("bf16", "int8-bf16")
    assert [P.openvino_hint(p) for p in ("fp32", "bf16", "int8", "int8-bf16", "fp16")] == ["f32", "bf16", "f32", "bf16", "f32"]
    assert combos("openvino/int8") == [("openvino", "int8"), ("openvino", "int8-bf16")]
    assert combos("openvino/fp16w") == [("openvino", "fp32"), ("openvino", "bf16")]
    manifest = {"graphs": {"vae_decoder": {"artifacts": {"openvino/fp32": {"files": ["a.xml"]}, "openvino/int8": {"files": ["b.xml"]}},
                                           "int8_gates": {"min_psnr": 33.0}}}}
    runs = {(p, path.name) for _, backend, p, path in bundle_configs(tmp_path, manifest) if backend == "openvino"}
    assert runs == {("fp32", "a.xml"), ("bf16", "a.xml"), ("int8", "b.xml"), ("int8-bf16", "b.xml")}
    assert {p: P.openvino_artifacts(p)[0] for p, _ in runs} == {p: P.GATE_KEYS["openvino"][p] for p, _ in runs}
    assert tolerance(manifest, "vae_decoder", "int8-bf16") == tolerance(manifest, "vae_decoder", "int8") == {"min_psnr": 33.0}


def test_benchmarks_mark_what_auto_picks_at_its_probe_batch():
    """runtimes.bench and scripts/bench_int8.py mark auto's choice with the same rule; a faster
    artifact whose gate failed, a baseline or another batch is never marked."""
    m = manifest_with({"fp32": True, "bf16": True, "int8": False}, "openvino")
    rows = [{"graph": "vae_decoder", "backend": "openvino", "precision": p, "batch": b, "p50_ms": ms}
            for p, b, ms in (("fp32", 1, 100.0), ("bf16", 1, 60.0), ("int8", 1, 30.0), ("fp32", 2, 150.0), ("bf16", 2, 90.0))]
    rows.append({"graph": "vae_decoder", "backend": "openvino", "precision": "bf16", "batch": 1, "p50_ms": 1.0, "baseline": True})
    timings = P.mark_auto(rows, m, "p50_ms")
    assert [(r["precision"], r["batch"]) for r in rows if r.get("auto")] == [("bf16", 1)]
    assert timings == {"openvino": {"vae_decoder": {"fp32": 100.0, "bf16": 60.0, "int8": 30.0}}}
    m = manifest_with({"fp32": True, "bf16": True, "int8": True}, "openvino")
    for r in rows:
        r.pop("auto", None)
    P.mark_auto(rows, m, "p50_ms")
    assert [(r["precision"], r["batch"]) for r in rows if r.get("auto")] == [("int8", 1)]


def test_benchmark_rounds_report_medians_so_one_slow_spell_does_not_decide_auto():
    """runtimes.bench times each configuration in rounds that take turns; a row is the median of its
    rounds (runs added up), so one round in a slow spell does not flip which artifact auto marks; a failed
    round fails the row."""
    from runtimes.bench import merge_rounds

    def timed(p50, peak):
        return {"load_s": 0.2, "first_ms": 3 * p50, "p50_ms": p50, "p90_ms": 1.1 * p50, "runs": 10,
                "base_rss_mb": 55.0, "peak_rss_mb": peak, "model_rss_mb": peak - 55.0}

    bf16 = merge_rounds([timed(30.0, 170.0), timed(31.0, 172.0), timed(29.0, 171.0)])
    int8 = merge_rounds([timed(24.0, 160.0), timed(50.0, 161.0), timed(23.0, 159.0)])  # round 2 in a slow spell
    assert int8["p50_ms"] == 24.0 and bf16["p50_ms"] == 30.0 and int8["runs"] == 30 and int8["rounds"] == 3
    assert int8["peak_rss_mb"] == 160.0 and int8["model_rss_mb"] == 105.0
    m = manifest_with({"fp32": True, "bf16": True, "int8": True}, "openvino")
    rows = [{"graph": "vae_decoder", "backend": "openvino", "precision": p, "batch": 1, **r}
            for p, r in (("bf16", bf16), ("int8", int8))]
    P.mark_auto(rows, m, "p50_ms")
    assert [r["precision"] for r in rows if r.get("auto")] == ["int8"]
    assert merge_rounds([timed(24.0, 160.0), {"error": "RuntimeError: no such device"}]) == {"error": "RuntimeError: no such device"}


def test_auto_probes_once_caches_per_cpu_and_reads_stored_benchmarks(tmp_path, monkeypatch, capsys):
    from dcae_edge.checkpoints import save_autoencoder
    from export.onnx import main

    from runtimes import open_bundle

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_autoencoder(make_model(tiny_edge_f64(), seed=9), tmp_path / "ae.safetensors")
    main(["--weights", str(tmp_path / "ae.safetensors"), "--graphs", "vae_decoder", "--resolution", "128", "--fp16",
          "--out", str(tmp_path / "b")])
    z = np.random.default_rng(0).standard_normal((1, 128, 2, 2)).astype(np.float32)
    pipe = open_bundle(tmp_path / "b")  # "auto" is the default
    out = pipe.decode(z)
    picked = pipe.precision_of("vae_decoder")
    assert picked in ("fp32", "fp16") and "precision auto: vae_decoder -> onnxruntime" in capsys.readouterr().out
    assert np.abs(out - open_bundle(tmp_path / "b", precision=picked).decode(z)).max() == 0
    cached = list((tmp_path / "cache" / "dcae-edge" / "precision").glob("*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())["vae_decoder"]) == {"fp32", "fp16"}
    monkeypatch.setattr(P, "probe", lambda *a, **k: pytest.fail("probed again despite the cache"))
    assert open_bundle(tmp_path / "b").precision_of("vae_decoder") == picked
    assert "cached probe" in capsys.readouterr().out
    # a damaged cache is probed again, not a crash: unreadable JSON, then one entry no probe could have written
    probed = []

    def fake_probe(factory, manifest, graph, missing):
        probed.append(sorted(missing))
        return {p: 5.0 for p in missing}

    monkeypatch.setattr(P, "probe", fake_probe)
    cached[0].write_text('{"vae_decoder": {"fp32": 3.0')
    assert open_bundle(tmp_path / "b").precision_of("vae_decoder") in ("fp32", "fp16") and probed == [["fp16", "fp32"]]
    assert "ignoring the unreadable probe cache" in capsys.readouterr().out
    cached[0].write_text(json.dumps({"vae_decoder": {"fp32": "fast", "fp16": 2.0}}))
    assert open_bundle(tmp_path / "b").precision_of("vae_decoder") == "fp16" and probed[-1] == ["fp32"]
    assert json.loads(cached[0].read_text()) == {"vae_decoder": {"fp16": 2.0, "fp32": 5.0}}
    # timings stored in the bundle for this CPU win over any probe
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    other = "fp16" if picked == "fp32" else "fp32"
    m["benchmarks"] = {P.cpu_key(): {"onnxruntime": {"vae_decoder": {picked: 9.0, other: 1.0}}}}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    assert open_bundle(tmp_path / "b").precision_of("vae_decoder") == other
    assert open_bundle(tmp_path / "b", precision="fp32").precision_of("vae_decoder") == "fp32"  # forcing still works


def test_benchmark_verdict_reads_int8_against_f32_where_the_cpu_has_no_bf16():
    """On a CPU without native bf16 (AVX2) the bf16 rows are skipped with the reason, and INT8 is judged
    against the fastest f32 decoder; with bf16 rows, against OpenVINO bf16 as before."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_int8", Path(__file__).parents[1] / "scripts" / "bench_int8.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda b, p, ms: {"graph": "vae_decoder", "backend": b, "precision": p, "median_ms": ms}  # noqa: E731
    manifest = {"calibration": {"openvino": {"gates": {"end_to_end": {"value": 0.1}}}}}
    avx2 = [row("onnxruntime", "fp32", 177.0), row("openvino", "f32", 160.0), row("openvino", "int8 (+f32)", 94.0),
            {"graph": "vae_decoder", "backend": "openvino", "precision": "bf16", "skipped": bench.NO_BF16}]
    lines = bench.verdict(avx2, manifest, 1.5, 0.3)
    assert "no native bf16" in lines[0] and "vs openvino f32 160.0 ms: 1.70x" in lines[1] and lines[2] == "Target met."
    bf16 = avx2[:3] + [row("openvino", "bf16", 120.0)]
    lines = bench.verdict(bf16, manifest, 1.5, 0.3)
    assert "vs openvino bf16 120.0 ms: 1.28x" in lines[0] and lines[1].startswith("Target missed: INT8 is 1.28x bf16")


def test_bf16_precisions_are_not_candidates_without_native_bf16(monkeypatch):
    """Without native bf16 OpenVINO runs the bf16 hint in f32: bf16 and int8-bf16 would be fp32 and int8
    timed twice under other names, so auto leaves them out."""
    m = manifest_with({"fp32": True, "bf16": True, "int8": True}, "openvino")
    m["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]["validation_bf16"] = {"pass": True}
    assert P.gated(m, "vae_decoder", "openvino") == ["fp32", "bf16", "int8", "int8-bf16"]
    monkeypatch.setattr(P, "_openvino_bf16", lambda: False)
    assert P.gated(m, "vae_decoder", "openvino") == ["fp32", "int8"]


def test_an_overflow_under_auto_reruns_at_fp32_and_stays_there(tmp_path, monkeypatch):
    """fp16 on a GPU or an NPU can overflow on an input its gate never saw. Under auto that call runs again at fp32
    (a warning says so) and the graph stays at fp32; an fp16 asked for by name raises, saying what to do. The
    overflow is injected: ONNX Runtime's CPU fp16 does not overflow on this tiny model."""
    from dcae_edge.checkpoints import save_autoencoder
    from export.onnx import main

    from runtimes import open_bundle
    from runtimes.pipeline import NonFiniteOutput

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_autoencoder(make_model(tiny_edge_f64(), seed=9), tmp_path / "ae.safetensors")
    main(["--weights", str(tmp_path / "ae.safetensors"), "--graphs", "vae_decoder", "--resolution", "128", "--fp16",
          "--out", str(tmp_path / "b")])
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())  # timings stored in the bundle: auto picks fp16
    m["benchmarks"] = {P.cpu_key(): {"onnxruntime": {"vae_decoder": {"fp32": 9.0, "fp16": 1.0}}}}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    z = np.random.default_rng(0).standard_normal((2, 128, 2, 2)).astype(np.float32)

    def overflowing(pipe):
        runner = pipe._runner("vae_decoder")
        real = runner.run

        def run(feeds):
            out = real(feeds)[0].copy()
            out.flat[::7] = np.inf
            return [out]

        runner.run = run
        return pipe

    pipe = overflowing(open_bundle(tmp_path / "b"))
    assert pipe.precision_of("vae_decoder") == "fp16"
    with pytest.warns(UserWarning, match=r"vae_decoder at fp16 returned \d+ NaN/Inf values on this input \(an overflow "
                                         r"at fp16\): precision auto runs it at fp32 from now on"):
        out = pipe.decode(z)
    assert np.array_equal(out, open_bundle(tmp_path / "b", precision="fp32").decode(z))
    assert pipe.precision_of("vae_decoder") == "fp32" and pipe.ran_as() == {"vae_decoder": "fp32"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stays at fp32: no second warning
        pipe.decode(z)
    forced = overflowing(open_bundle(tmp_path / "b", precision="fp16"))
    with pytest.raises(NonFiniteOutput, match=r"vae_decoder \(onnxruntime fp16\) returned \d+ NaN/Inf values: an overflow "
                                              "at this precision; run it at fp32"):
        forced.decode(z)
    assert forced.precision_of("vae_decoder") == "fp16"

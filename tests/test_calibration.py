"""INT8 calibration (python -m calibration) on a tiny f64c128 bundle: every backend that works on
Linux produces graphs that really hold int8 computation, gates are enforced, bad calibration
sets fail clearly, and a failed run leaves the bundle byte-identical."""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration import CalibrationError
from calibration.__main__ import run_cli
from calibration.data import FeedSet, check_feeds, trajectory_feeds
from conftest import ROOT, make_model, tiny_edge_f64

# small sets keep the whole file around a minute on 2 cores
FAST = ["--num-samples", "4", "--num-eval", "2", "--steps", "3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny f64c128 autoencoder and a tiny class-conditional DiT, saved."""
    from dcae_edge.checkpoints import save_autoencoder
    from dcae_edge.denoiser import build_denoiser, save_denoiser

    tmp = tmp_path_factory.mktemp("models")
    save_autoencoder(make_model(tiny_edge_f64()), tmp / "ae.safetensors")
    torch.manual_seed(0)
    dn = build_denoiser("dit-tiny", input_size=2, in_channels=128, num_classes=4, hidden_size=32, depth=1)
    g = torch.Generator().manual_seed(0)
    # DiT's output layer starts at zero: give it weights so outputs mean something (only the final
    # layer: export.openvino's f32 check currently fails for DiTs with non-zero adaLN blocks)
    with torch.no_grad():
        for name, p in dn.named_parameters():
            if name.startswith("net.final"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_denoiser(dn, tmp / "dn.safetensors")
    return ["--variant", "f64", "--weights", str(tmp / "ae.safetensors"), "--resolution", "128", "--static"], \
        tmp / "dn.safetensors"


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory):
    """A static 128px bundle: encoder, decoder and the DiT for ONNX and OpenVINO."""
    from export import onnx, openvino

    common, dn = models
    out = tmp_path_factory.mktemp("ov") / "bundle"
    onnx.main(common + ["--denoiser", str(dn), "--out", str(out)])
    openvino.main(common + ["--denoiser", str(dn), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def coreml_bundle(models, tmp_path_factory):
    """The decoder as a Core ML package, plus the fp32 ONNX encoder/decoder that measure it on Linux."""
    from export import coreml, onnx

    common, _ = models
    out = tmp_path_factory.mktemp("coreml") / "bundle"
    coreml.main(common + ["--denoiser", "none", "--graphs", "vae_decoder", "--out", str(out)])
    onnx.main(common + ["--denoiser", "none", "--out", str(out)])
    return out


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Photo folders (the packaged photos split by photo: data/ is not in git) and the set cache."""
    from dcae_edge.data import ASSET_PHOTOS

    root = tmp_path_factory.mktemp("data")
    assets = ROOT / "dcae_edge" / "assets"
    for folder, names in (("calibration", ASSET_PHOTOS[:2]), ("eval", ASSET_PHOTOS[2:])):
        (root / folder).mkdir()
        for name in names:
            shutil.copy(assets / f"{name}.jpg", root / folder)
    return root


def calibrate(path, backend, data_dir, *extra) -> int:
    return run_cli(["--bundle", str(path), "--backend", backend, "--cache-dir", str(data_dir / "sets"),
                    "--data", str(data_dir / "calibration"), "--eval-data", str(data_dir / "eval"), *FAST, *extra])


def manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_onnxruntime_int8_qdq_graphs_and_report(copy, data_dir):
    # the encoder gate sits above what plain INT8 reaches: the sensitivity rounds must keep nodes in float
    # (--no-latency-aware: on these tiny graphs fp32 wins most convolutions, and this test is about the QDQ graph)
    assert calibrate(copy, "onnxruntime", data_dir, "--encoder-min-cosine", "0.993", "--no-latency-aware") == 0
    import onnx
    import onnx.numpy_helper

    m = manifest(copy)
    for graph in ("vae_encoder", "vae_decoder", "transformer"):
        art = m["graphs"][graph]["artifacts"]["onnx/int8"]
        model = onnx.load(str(copy / art["files"][0]))
        ops = collections.Counter(n.op_type for n in model.graph.node)
        q_out = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        pairs = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out)
        int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
        assert pairs >= 5 and ops["QuantizeLinear"] >= 5 and len(int8) >= 5, (graph, ops)
        assert art["counts"]["qdq_pairs"] == pairs and art["gate"]["pass"]
        assert art["calibration_set"]["hash"].startswith("sha256:") and art["calibration_set"]["size"] >= 3
        assert art["settings"]["activations"] == "QUInt8"
        # 7-bit weights: ORT's U8S8 kernels cannot saturate on CPUs without VNNI (255 * 64 * 2 < 2**15)
        assert art["settings"]["weight_bits"] == 7 and max(abs(onnx.numpy_helper.to_array(i)).max() for i in int8) <= 64
    enc = m["graphs"]["vae_encoder"]["artifacts"]["onnx/int8"]
    assert enc["gate"]["value"] >= 0.993 and enc["excluded_nodes"], "the sensitivity step kept nothing in float"
    assert all("SQNR" in e["reason"] for e in enc["excluded_nodes"])
    summary = m["calibration"]["onnxruntime"]
    assert summary["gates"]["end_to_end"]["pass"] and summary["gates"]["end_to_end"]["value"] <= 0.3
    for f in ("onnxruntime.json", "onnxruntime.md", "onnxruntime.png"):
        assert (copy / "calibration" / f).is_file()
    assert "Kept in float" in (copy / "calibration" / "onnxruntime.md").read_text()


def test_onnxruntime_latency_mix_keeps_slow_convs_in_float(copy, data_dir, monkeypatch):
    """The OpenVINO pass's rule for ORT: injected timings make two decoder convs slower in INT8 and the
    mix faster end to end; they are then float in the saved QDQ graph and the gate still holds."""
    import onnx

    from calibration.onnxruntime import OnnxRuntimeBackend, quantized_nodes

    # real timings first: ORT's profiler names map back to the quantized convolutions (through QLinearConv)
    assert calibrate(copy, "onnxruntime", data_dir, "--graphs", "vae_decoder") == 0
    rows = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["onnx/int8"]["layer_latency"]
    assert rows and all(r["int8_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)
    assert any(r["node"].endswith("Conv") for r in rows)
    # the INT8 graph written is timed whole against its fp32 graph, and the report says which won here
    vs = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["onnx/int8"]["versus_float"]
    assert vs["int8_ms"] > 0 and vs["float_ms"] > 0 and vs["float"] == "fp32" and vs["speedup"] == round(vs["float_ms"] / vs["int8_ms"], 3)
    assert "- end to end on this CPU: INT8 " in (copy / "calibration" / "onnxruntime.md").read_text()

    def fake(self, graph, attempt):
        names = sorted(n.name for n in quantized_nodes(onnx.load(str(attempt.handle))))
        slow = [n for n in names if n.endswith("Conv")][:2]
        return slow, [{"node": n, "int8_ms": 2.0 if n in slow else 0.5, "fp32_ms": 1.0, "int8": n not in slow} for n in names]

    monkeypatch.setattr(OnnxRuntimeBackend, "latency_exclusions", fake)
    timings = []  # graphs per graph_ms call: the mix, the accuracy-chosen graph and the fp32 graph in one set of rounds

    def timed(self, graph, attempts):
        timings.append(len(attempts))
        return [1.0, 2.0, 3.0][:len(attempts)]

    monkeypatch.setattr(OnnxRuntimeBackend, "graph_ms", timed)
    assert calibrate(copy, "onnxruntime", data_dir, "--graphs", "vae_decoder") == 0
    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["onnx/int8"]
    still_int8 = {n.name for n in quantized_nodes(onnx.load(str(copy / art["files"][0])))}
    assert len(art["kept_float_for_speed"]) == 2 and not set(art["kept_float_for_speed"]) & still_int8
    assert art["gate"]["pass"] and art["latency_check"] == {"mix_ms": 1.0, "accuracy_chosen_ms": 2.0, "hint": "fp32", "float_ms": 3.0,
                                                            "chosen_ms": 1.0}
    assert timings == [3] and art["versus_float"]["int8_ms"] == 1.0 and art["versus_float"]["speedup"] == 3.0
    assert "end to end on this CPU: INT8 1.0 ms vs fp32 3.0 ms (3.00x faster)" in (copy / "calibration" / "onnxruntime.md").read_text()


def test_openvino_int8_fake_quantize(copy, data_dir):
    # the quantizer itself: the latency pass (tested below with injected timings) may keep nearly every op
    # of these tiny graphs in float on a busy or bf16-fast CPU (CI: 1 FakeQuantize left in the encoder)
    assert calibrate(copy, "openvino", data_dir, "--no-latency-aware") == 0
    import openvino as ov

    from calibration.openvino import quantized_ops, shortcut_convolutions

    m = manifest(copy)
    core = ov.Core()
    for graph in ("vae_encoder", "vae_decoder", "transformer"):
        art = m["graphs"][graph]["artifacts"]["openvino/int8"]
        ir = core.read_model(str(copy / art["files"][0]))
        ops = collections.Counter(op.get_type_name() for op in ir.get_ops())
        int8 = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8")]
        assert ops["FakeQuantize"] >= 3 and len(int8) >= 3, (graph, ops)
        assert art["gate"]["pass"] and art["counts"]["FakeQuantize"] == ops["FakeQuantize"]
        # the shortcuts (convolutions of constant weights, export.graph_forms) stay float: data movement
        shortcuts = shortcut_convolutions(ir)
        assert (len(shortcuts) > 0) == (graph != "transformer") and not set(shortcuts) & quantized_ops(ir), (graph, shortcuts)
        # the same gate with the float remainder in bf16: measured where the CPU has native bf16, else said why not
        vb = art["validation_bf16"]
        assert ("pass" in vb and "gate" in vb) or "executes the bf16 hint as f32" in vb["skipped"], vb
    assert m["calibration"]["openvino"]["gates"]["end_to_end"]["pass"]
    # precision "int8-bf16": the INT8 IR at the bf16 hint; an OpenVINO precision only
    from runtimes import open_bundle
    from runtimes.pipeline import BundleError

    pipe = open_bundle(copy, backend="openvino", precision="int8-bf16")
    side = pipe.resolution // pipe.spatial_compression
    z = np.random.default_rng(0).standard_normal((1, pipe.latent_channels, side, side)).astype(np.float32)
    assert np.isfinite(pipe.decode(z)).all()
    assert pipe._artifact("vae_decoder")[0] == "openvino/int8"
    from runtimes.backends import openvino_runs_bf16  # without native bf16 the plugin runs f32 and the label says so

    assert pipe.active_providers["vae_decoder"] == (["openvino:CPU:bf16"] if openvino_runs_bf16()
                                                    else ["openvino:CPU:f32 (bf16 asked; no native bf16)"])
    assert pipe.ran_as() == {"vae_decoder": "int8-bf16" + ("" if openvino_runs_bf16() else " (run as f32: no native bf16 here)")}
    with pytest.raises(BundleError, match="OpenVINO precision"):
        open_bundle(copy, precision="int8-bf16").decode(z)


def test_latency_aware_mix_keeps_slow_ops_in_float_and_the_gates(copy, data_dir, monkeypatch):
    """Ops that INT8 does not make faster on this CPU stay float; the gate still holds. Real
    per-layer timings are recorded; then injected timings make two decoder ops 'slow'."""
    from calibration.openvino import OpenVinoBackend, quantized_ops

    assert calibrate(copy, "openvino", data_dir, "--graphs", "vae_decoder") == 0
    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]
    rows = art["layer_latency"]
    assert rows and all({"node", "int8_ms", "int8"} <= set(r) for r in rows)
    assert "Latency on this CPU, per quantized op" in (copy / "calibration" / "openvino.md").read_text()
    real = OpenVinoBackend.latency_exclusions

    def fake(self, graph, attempt):
        # the attempt is parked as an IR in the work folder: no ov.Model (nor the source it maps) held between passes
        assert isinstance(attempt.handle, str) and Path(attempt.handle).with_suffix(".bin").is_file(), attempt.handle
        slow, rows = real(self, graph, attempt)
        chosen = sorted(quantized_ops(attempt.handle))[:2]
        return chosen, [{**r, "int8": r["node"] not in chosen} for r in rows]

    monkeypatch.setattr(OpenVinoBackend, "latency_exclusions", fake)
    monkeypatch.setattr(OpenVinoBackend, "graph_ms", lambda self, graph, attempts: [1.0, 2.0])  # the mix is faster
    assert calibrate(copy, "openvino", data_dir, "--graphs", "vae_decoder") == 0
    import openvino as ov

    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]
    ir = ov.Core().read_model(str(copy / art["files"][0]))
    assert len(art["kept_float_for_speed"]) == 2 and not set(art["kept_float_for_speed"]) & quantized_ops(ir)
    assert art["gate"]["pass"] and art["latency_check"]["mix_ms"] == 1.0
    in_int8_with_mix = quantized_ops(ir)

    # per-op timings miss the reorders a mix adds: a mix that is slower end to end is not kept
    monkeypatch.setattr(OpenVinoBackend, "graph_ms", lambda self, graph, attempts: [2.5, 2.0])
    assert calibrate(copy, "openvino", data_dir, "--graphs", "vae_decoder") == 0
    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]
    ir = ov.Core().read_model(str(copy / art["files"][0]))
    assert not art.get("kept_float_for_speed") and art["latency_check"] == {"mix_ms": 2.5, "accuracy_chosen_ms": 2.0,
                                                                            "hint": art["latency_check"]["hint"], "chosen_ms": 2.0}
    assert all(r["int8"] for r in art["layer_latency"]) and quantized_ops(ir) > in_int8_with_mix  # the two ops are INT8 again
    assert "the mix is not kept" in (copy / "calibration" / "openvino.md").read_text()

    # level within timing noise (AUTO_TIE) and more accurate (two ops back in float): the mix is kept
    monkeypatch.setattr(OpenVinoBackend, "graph_ms", lambda self, graph, attempts: [2.04, 2.0])
    assert calibrate(copy, "openvino", data_dir, "--graphs", "vae_decoder") == 0
    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]
    assert len(art["kept_float_for_speed"]) == 2 and "more accurate" in art["latency_check"]["tie"]
    assert art["gate"]["value"] > float(art["latency_check"]["tie"].split("(")[1].split(" vs ")[1].split()[0])

    # a CPU whose float path beats INT8 on every op (a Xeon's bf16 on a tiny graph): the accuracy-chosen
    # INT8 graph stays (it is still a quarter of the weight bytes) and the report says float is faster
    def all_slow(self, graph, attempt):
        _, rows = real(self, graph, attempt)
        return [r["node"] for r in rows], [{**r, "int8": False} for r in rows]

    monkeypatch.setattr(OpenVinoBackend, "latency_exclusions", all_slow)
    assert calibrate(copy, "openvino", data_dir, "--graphs", "vae_decoder") == 0
    art = manifest(copy)["graphs"]["vae_decoder"]["artifacts"]["openvino/int8"]
    ir = ov.Core().read_model(str(copy / art["files"][0]))
    assert quantized_ops(ir) and art["int8_faster_nowhere"] and not art.get("kept_float_for_speed")
    assert "float is the faster choice here" in (copy / "calibration" / "openvino.md").read_text()


def test_coreml_int8_weights(coreml_bundle, data_dir, capsys, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(coreml_bundle, copy)
    assert calibrate(copy, "coreml", data_dir) == 0
    assert "activation quantization skipped" in capsys.readouterr().out
    from coremltools.proto import MIL_pb2

    from export.coreml import import_coremltools

    ct = import_coremltools()
    m = manifest(copy)
    assert m["calibration"]["coreml"]["graphs"] == ["vae_decoder"]  # the graphs that have a Core ML package
    for graph in ("vae_decoder",):
        art = m["graphs"][graph]["artifacts"]["coreml/int8w"]
        spec = ct.models.MLModel(str(copy / art["files"][0]), skip_model_load=True).get_spec()
        func = spec.mlProgram.functions["main"]
        ops = [op for op in func.block_specializations[func.opset].operations if op.type == "constexpr_affine_dequantize"]
        int8 = [op for op in ops if MIL_pb2.DataType.Name(op.attributes["quantized_data"].type.tensorType.dataType) == "INT8"]
        assert len(int8) >= 3, graph
        assert art["gate"]["pass"] and art["counts"]["simulated_weights"] == art["counts"]["compressed_weights"]


def test_impossible_gate_fails_and_leaves_bundle_untouched(copy, data_dir, capsys):
    before = (copy / "manifest.json").read_bytes()
    files = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    rc = calibrate(copy, "onnxruntime", data_dir, "--graphs", "vae_decoder", "--decoder-min-psnr", "200", "--max-rounds", "2")
    assert rc == 1
    out, err = capsys.readouterr()
    assert "vae_decoder INT8 misses its gate" in err and "the bundle was not modified" in err
    assert "measured: output SQNR" in out and "round measured 2" in out  # the measured rounds ran, and failed too
    assert (copy / "manifest.json").read_bytes() == before
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == files
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".bundle")]  # no staging/backup left over


def test_skip_failed_graphs_writes_the_graphs_that_pass(copy, data_dir, capsys):
    """--skip-failed-graphs: a graph that misses its gate gets no artifact (said, and recorded), the others are
    written in the same run; without the flag the same run writes nothing."""
    args = ("--graphs", "vae_decoder", "transformer", "--transformer-min-cosine", "1.01", "--max-rounds", "1", "--measure-minutes", "0")
    assert calibrate(copy, "onnxruntime", data_dir, *args) == 1
    assert "onnx/int8" not in manifest(copy)["graphs"]["vae_decoder"]["artifacts"]
    assert calibrate(copy, "onnxruntime", data_dir, *args, "--skip-failed-graphs") == 0
    said = capsys.readouterr().out
    assert "--skip-failed-graphs: transformer gets no onnx/int8 artifact (transformer INT8 misses its gate" in said
    m = manifest(copy)
    assert m["graphs"]["vae_decoder"]["artifacts"]["onnx/int8"]["validation"]["pass"]
    assert "onnx/int8" not in m["graphs"]["transformer"]["artifacts"]
    assert list(m["calibration"]["onnxruntime"]["graphs_left_out"]) == ["transformer"]
    assert "| transformer | left out (--skip-failed-graphs) |" in (copy / "calibration" / "onnxruntime.md").read_text()


def _npz(tmp_path, **arrays):
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("empty", "no usable images"),
    ("missing", "python -m dcae_edge.photos --out data/photos"),
    ("nan", "NaN/Inf"),
    ("resolution", "the graph takes [1, 3, 128, 128]"),
    ("channels", "the graph takes [1, 128, 2, 2]"),
    ("truncated", "is not a readable .npz archive of arrays"),
    ("scalar", "vae_decoder.latent_sample is a single value"),
])
def test_bad_calibration_sets_are_refused(copy, data_dir, tmp_path, capsys, case, message):
    rng = np.random.default_rng(0)
    if case == "empty":
        (tmp_path / "empty").mkdir()
        data, graph = tmp_path / "empty", "vae_encoder"
    elif case == "missing":
        data, graph = tmp_path / "nowhere", "vae_encoder"
    elif case == "nan":
        z = rng.standard_normal((3, 1, 128, 2, 2)).astype(np.float32)
        z[1, 0, 5] = np.nan
        data, graph = _npz(tmp_path, **{"vae_decoder.latent_sample": z}), "vae_decoder"
    elif case == "resolution":
        data, graph = _npz(tmp_path, **{"vae_encoder.sample": rng.uniform(-1, 1, (3, 1, 3, 64, 64)).astype(np.float32)}), "vae_encoder"
    elif case == "truncated":  # a copy cut short
        whole = _npz(tmp_path, **{"vae_decoder.latent_sample": rng.standard_normal((3, 1, 128, 2, 2)).astype(np.float32)})
        whole.write_bytes(whole.read_bytes()[:200])
        data, graph = whole, "vae_decoder"
    elif case == "scalar":
        data, graph = _npz(tmp_path, **{"vae_decoder.latent_sample": np.float32(1)}), "vae_decoder"
    else:
        data, graph = _npz(tmp_path, **{"vae_decoder.latent_sample": rng.standard_normal((3, 1, 32, 2, 2)).astype(np.float32)}), "vae_decoder"
    before = (copy / "manifest.json").read_bytes()
    assert calibrate(copy, "onnxruntime", data_dir, "--graphs", graph, "--data", str(data)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert (copy / "manifest.json").read_bytes() == before


def test_missing_backend_artifact_names_the_export_command(copy, data_dir, capsys):
    assert calibrate(copy, "coreml", data_dir, "--graphs", "vae_encoder") == 2
    assert "python -m export.coreml" in capsys.readouterr().err


def test_trajectory_feeds_cover_the_schedule_in_cfg_batches():
    manifest = {"denoiser": {"config": {"in_channels": 4, "input_size": 2, "num_classes": 3, "prediction": "flow"},
                             "sampler": "euler"}}
    seen = []

    def fp32(feeds):  # a stand-in denoiser: records its inputs, predicts zero velocity
        seen.append(feeds)
        return [np.zeros_like(feeds["hidden_states"])]

    feeds = trajectory_feeds(fp32, manifest, batch=2, count=7, steps=4, cfg_scale=3.0, seed=0)
    assert len(feeds) == 8 and feeds == seen  # whole trajectories: 2 x 4 steps
    for f in feeds:
        assert f["hidden_states"].shape == (2, 4, 2, 2) and f["timestep"].dtype == np.float32
        assert f["class_labels"].dtype == np.int64 and f["class_labels"][1] == 3  # second half = null class
        assert np.array_equal(f["hidden_states"][0], f["hidden_states"][1])        # same latent, cond + uncond
    times = sorted({float(f["timestep"][0]) for f in feeds})
    assert times[-1] == 1000.0 and times[0] <= 250.0  # from pure noise to the last step
    assert len({int(f["class_labels"][0]) for f in feeds}) == 2  # one class per trajectory


def test_check_feeds_rejects_wrong_dtype():
    manifest = {"resolution": 128, "dynamic": False, "autoencoder": {"spatial_compression": 64},
                "graphs": {"transformer": {"inputs": [
                    {"name": "hidden_states", "dtype": "float32", "shape": ["batch", 128, 2, 2]},
                    {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
                    {"name": "class_labels", "dtype": "int64", "shape": ["batch"]}]}}}
    feeds = {"hidden_states": np.zeros((2, 128, 2, 2), np.float32), "timestep": np.zeros(2, np.float32),
             "class_labels": np.zeros(2, np.int32)}
    with pytest.raises(CalibrationError, match="class_labels.*int32, the graph takes int64"):
        check_feeds(FeedSet("transformer", "calibration", [feeds], "test"), manifest)
    with pytest.raises(CalibrationError, match="is empty"):
        check_feeds(FeedSet("transformer", "calibration", [], "test"), manifest)


def test_onnxruntime_int8_costs_charge_each_node_its_output_dequantize_and_its_share_of_the_input_quantize():
    """The ORT latency pass's rule (injected profile): a quantized conv costs its QLinearConv, the DequantizeLinear
    of its output and an equal share of the QuantizeLinear of its input; a QuantizeLinear that ORT fused into an
    INT8 producer has no time of its own; float nodes are not charged."""
    from onnx import helper

    from calibration.onnxruntime import int8_node_costs

    def qdq(t):  # the quantizer's naming: <tensor>_QuantizeLinear -> <tensor>_DequantizeLinear
        return [helper.make_node("QuantizeLinear", [t, "s", "z"], [t + "_QuantizeLinear_Output"], name=t + "_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [t + "_QuantizeLinear_Output", "s", "z"], [t + "_DequantizeLinear_Output"],
                                 name=t + "_DequantizeLinear")]

    def weight(w):
        return helper.make_node("DequantizeLinear", [w, "s", "z"], [w + "_DequantizeLinear_Output"], name=w + "_DequantizeLinear")

    nodes = [*qdq("x"), weight("wa"), weight("wb"), weight("wc"),
             helper.make_node("Conv", ["x_DequantizeLinear_Output", "wa_DequantizeLinear_Output"], ["y"], name="conv_a"),
             helper.make_node("Conv", ["x_DequantizeLinear_Output", "wb_DequantizeLinear_Output"], ["z"], name="conv_b"),
             *qdq("y"), helper.make_node("Relu", ["y_DequantizeLinear_Output"], ["r"], name="relu"),
             *qdq("z"), helper.make_node("Conv", ["z_DequantizeLinear_Output", "wc_DequantizeLinear_Output"], ["c"], name="conv_c")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    profile = {"x_QuantizeLinear": 0.4, "conv_a_token_1": 1.0, "y_DequantizeLinear": 0.5, "conv_b_token_2": 2.0,
               "conv_c_token_3": 1.0, "relu": 9.0}  # z's QuantizeLinear is fused into conv_b's QLinearConv
    costs = int8_node_costs(model, profile)
    assert costs == pytest.approx({"conv_a": 1.0 + 0.5 + 0.2, "conv_b": 2.0 + 0.2, "conv_c": 1.0})


def test_openvino_op_costs_charge_quantize_steps_and_reorders_to_the_op_they_serve():
    """A quantize step that cannot fuse into its producer runs alone between two reorders: the latency
    pass charges all of it to the INT8 op it feeds (reorders are named <producer>_<formats>_<consumer>)."""
    import openvino as ov
    import openvino.opset13 as ops

    from calibration.openvino import op_costs

    x = ops.parameter([1, 4, 8, 8], np.float32, name="x")
    lo, hi = ops.constant(np.float32(-1)), ops.constant(np.float32(1))
    fq = ops.fake_quantize(x, lo, hi, lo, hi, 256, name="conv/fq_input_0")
    conv = ops.convolution(fq, ops.constant(np.ones((4, 4, 1, 1), np.float32)), [1, 1], [0, 0], [0, 0], [1, 1], name="conv")
    shared = ops.fake_quantize(ops.relu(conv, name="act"), lo, hi, lo, hi, 256, name="FakeQuantize_7")
    left = ops.matmul(shared, ops.constant(np.ones((8, 8), np.float32)), False, False, name="mm_a")
    right = ops.matmul(shared, ops.constant(np.ones((8, 8), np.float32)), False, False, name="mm_b")
    model = ov.Model([left, right], [x])
    times = {("conv", "Convolution", "brgconv_I8"): 1.0,
             ("conv/fq_input_0", "FakeQuantize", "jit_f32"): 0.25,                  # named after its op
             ("x_bf16_acdb_f32_aBcd16b_conv/fq_input_0", "Reorder", "jit"): 0.5,    # into its quantize step
             ("conv/fq_input_0_aBcd16b_acdb_conv", "Reorder", "jit_I8"): 0.125,     # out of it, into the op
             ("FakeQuantize_7", "FakeQuantize", "jit_f32"): 0.5,                    # feeds two ops: half each
             ("act_bf16_abcd_f32_aBcd16b_FakeQuantize_7", "Reorder", "jit"): 1.0,
             ("mm_a", "MatMul", "brgemm_i8"): 0.1, ("mm_b", "MatMul", "brgemm_i8"): 0.2,
             ("act", "Relu", "jit"): 3.0, ("conv___act", "Reorder", "jit"): 2.0}     # the producer's, not charged
    costs = op_costs(times, model)
    assert costs == pytest.approx({"conv": 1.875, "mm_a": 0.85, "mm_b": 0.95})
    # the float graph: the same names, reorders into an op charged to it
    float_model = ov.Model([ops.matmul(ops.relu(ops.convolution(x, ops.constant(np.ones((4, 4, 1, 1), np.float32)), [1, 1], [0, 0], [0, 0], [1, 1], name="conv"), name="act"),
                                       ops.constant(np.ones((8, 8), np.float32)), False, False, name="mm_a")], [x])
    assert op_costs({("conv", "Convolution", "brgconv_bf16"): 2.0, ("x_abcd_aBcd16b_conv", "Reorder", "jit"): 0.5,
                     ("mm_a", "MatMul", "brgemm"): 0.3, ("act", "Relu", "jit"): 1.0}, float_model) == pytest.approx({"conv": 2.5, "mm_a": 0.3})


def test_cosine_gates_hold_on_every_held_out_feed():
    """A graph that is exact on most feeds and wrong on one passes a cosine over the whole set; the gate is
    the worst feed's (the digit transformer's all-INT8 graph: 0.9925 over the set, 0.93 on one feed)."""
    from calibration.quality import Gates, graph_gate

    rng = np.random.default_rng(0)
    feeds = [{"hidden_states": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(8)]
    scale = np.array([10.0] * 7 + [1.0], np.float32)  # the bad feed has small outputs, as late denoising steps
    reference = np.concatenate([f["hidden_states"] * s for f, s in zip(feeds, scale)])
    wrong = np.concatenate([reference[:14], -reference[14:]])  # the last feed's outputs flipped

    def run(feed, _out=iter(np.split(wrong, 8))):
        return [next(_out)]

    fs = FeedSet("transformer", "evaluation", feeds, "test")
    gate = graph_gate("transformer", Gates(), reference, run, fs)
    assert gate["cosine_whole_set"] >= 0.99 and gate["cosine"] == pytest.approx(-1.0) and not gate["pass"]


def test_exclusion_rounds_hold_one_compiled_attempt_at_a_time():
    """At paper size each compiled attempt holds the weights again: an attempt the rounds move past is
    released before the next quantization, and a released runner compiles again when it is called."""
    from calibration.sensitivity import Attempt, Candidate, CompiledOnDemand, keep_float_until_gate

    compiled, log = set(), []

    def quantize(excluded):
        n = len(excluded)
        log.append(("quantize", n, sorted(compiled)))  # what is compiled while the next attempt is made

        def make():
            compiled.add(n)
            return lambda feeds: [np.float32(n)]

        run = CompiledOnDemand(make)
        orig = run.release
        run.release = lambda: (compiled.discard(n), orig())
        return Attempt(run=run, counts={}, excluded=list(excluded))

    def evaluate(attempt):
        value = attempt.run({})[0]
        return {"pass": bool(value >= 2), "value": float(value)}

    ranking = [Candidate(f"n{i}", "Convolution", 10.0 - i, "w") for i in range(4)]
    outcome = keep_float_until_gate(quantize, evaluate, lambda a: ranking, str, max_rounds=4, max_excluded=1.0)
    assert outcome.gate["pass"] and len(outcome.excluded) == 2  # rounds with 0, 1, 3 nodes in float, then trimmed to 2
    assert [r["round"] for r in outcome.rounds] == [0, 1, 2, "trim 2"]
    assert [c for _, _, c in log] == [[], [], [], []]  # nothing compiled while quantizing (the trim round too)
    outcome.attempt.release()
    assert not compiled and outcome.attempt.run({})[0] == 2 and compiled == {2}  # compiled again on demand


def test_measured_rounds_find_the_nodes_that_reach_the_output():
    """When the SQNR order misses the gate (on the digit transformer it did with 23 of 47 nodes in float),
    every node is scored alone in float at the graph's output and the rounds run again in that order."""
    from calibration.sensitivity import Attempt, Candidate, failure_message, keep_float_until_gate

    damage = {"late_fc2": 3.0, "patch_embed": 2.0}  # output SQNR each costs; the SQNR ranking puts them last
    ranking = [Candidate(f"n{i}", "MatMul", float(i), "x") for i in range(6)] + \
              [Candidate(n, "MatMul", 30.0, "x") for n in damage]
    quantized = []

    def quantize(excluded):
        quantized.append(list(excluded))
        return Attempt(run=None, counts={}, excluded=list(excluded))

    def output_sqnr(attempt):
        return 30.0 - sum(d for n, d in damage.items() if n not in attempt.excluded)

    def evaluate(attempt):
        return {"pass": output_sqnr(attempt) >= 29.0, "value": output_sqnr(attempt)}

    outcome = keep_float_until_gate(quantize, evaluate, lambda a: ranking, str, max_rounds=3, max_excluded=0.5,
                                    measure=output_sqnr)
    assert outcome.gate["pass"] and outcome.mode == "measured exclusion rounds"
    assert [c.node for c in outcome.excluded] == ["late_fc2", "patch_embed"]  # 1, then 1 + 2 in float, trimmed to 2
    assert outcome.excluded[0].output_sqnr_db == 28.0 and outcome.excluded[0].all_int8_sqnr_db == 25.0
    assert "output SQNR 28.00 dB with it alone in float" in outcome.excluded[0].to_dict()["reason"]
    assert [r["round"] for r in outcome.rounds] == [0, 1, 2, 3, "measured 1", "measured 2", "trim 2"]
    assert len(quantized) == 4 + 1 + len(ranking) + 3  # rounds, all-INT8 again, one per node, measured rounds, trim

    # too slow to score every node: the SQNR rounds' failure stands, and the message says what was tried
    outcome = keep_float_until_gate(quantize, evaluate, lambda a: ranking, str, max_rounds=2, max_excluded=0.5,
                                    measure=output_sqnr, measure_budget_s=0)
    assert not outcome.gate["pass"] and outcome.mode == "exclusion rounds"
    assert "most sensitive of 8 quantized nodes" in failure_message("g", outcome, str, 2, 0.5)


@pytest.mark.parametrize("argv, message", [
    (["--measure-minutes", "-1"], "--measure-minutes -1.0: give 0 (never) or a positive budget"),
    (["--backend", "onnxruntime", "--palettize", "6"], "--palettize only applies to --backend coreml"),
    (["--max-excluded", "1.5"], "argument --max-excluded: 1.5: give a fraction above 0 and at most 1"),
    (["--num-samples", "0"], "argument --num-samples: 0: give at least 1"),
    (["--steps", "ten"], "argument --steps: 'ten' is not a whole number"),
])
def test_flag_mistakes_are_named(tmp_path, capsys, argv, message):
    from calibration.__main__ import parse

    base = ["--bundle", str(tmp_path)] + ([] if "--backend" in argv else ["--backend", "openvino"])
    with pytest.raises(SystemExit) as e:
        parse(base + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err

"""OpenVINO IR and Core ML export from the shared graph specs: every family, OpenVINO parity on
real photos with the f32 hint, Core ML spec checks (prediction only on macOS)."""
from __future__ import annotations

import json
import platform
import re

import numpy as np
import pytest

from conftest import make_model, tiny_denoiser, tiny_edge_f64, tiny_in_mix, tiny_sana
from dcae_edge.checkpoints import save_autoencoder
from dcae_edge.denoiser import save_denoiser
from export.bundle import sha256_file


@pytest.fixture(scope="module")
def f64_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ovc")
    save_autoencoder(make_model(tiny_edge_f64(), seed=1), d / "ae.safetensors")
    save_denoiser(tiny_denoiser(input_size=2), d / "dn.safetensors")
    return d


def test_openvino_all_graphs_within_onnx_tolerance(f64_files):
    from export import openvino as ov

    out = f64_files / "bundle"
    ov.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", str(f64_files / "dn.safetensors"),
             "--out", str(out), "--resolution", "128"])
    m = json.loads((out / "manifest.json").read_text())
    for graph in ("vae_encoder", "vae_decoder", "transformer"):
        art = m["graphs"][graph]["artifacts"]["openvino/fp32"]
        assert art["validation"]["pass"], graph
        assert all(r["max_abs"] <= 1e-4 + 1e-5 * 10 for r in art["validation"]["results"])
        assert len(art["validation"]["results"]) >= 2  # export shape + an unseen batch/size
        assert "validation_bf16" in art  # the CPU's default precision is measured separately
        assert (out / graph / "openvino_model.xml").is_file() and (out / graph / "openvino_model.bin").is_file()
    assert m["graphs"]["vae_decoder"]["artifacts"]["openvino/fp32"]["runtime_options"] == {"ACTIVATIONS_SCALE_FACTOR": "8.0"}
    import openvino

    from calibration.openvino import shortcut_convolutions
    from dcae_edge.checkpoints import load_autoencoder
    from export.graph_forms import folds_shortcut, shortcut_convolution

    ae = load_autoencoder(str(f64_files / "ae.safetensors"))
    # pixel_shuffle is one DepthToSpace, not Reshape-Transpose-Reshape (the validation above holds it to torch's
    # channel order); the encoder's pixel_unshuffles went into strided convolutions (graph form strided_downsample)
    for graph, op, present in (("vae_encoder", "SpaceToDepth", False), ("vae_decoder", "DepthToSpace", True)):
        xml = (out / graph / "openvino_model.xml").read_text()
        assert (f'type="{op}"' in xml) == present and "pixel_shuffle/Transpose" not in xml and "pixel_unshuffle/Transpose" not in xml, graph
        # export.graph_forms: no Transposes around the attention projections, no channel split in GLUMBConv
        # (what is left to split is attention's q/k/v), no Tile in the shortcuts
        forms = (["pointwise_projections", "glu_halves", "shortcut_convolutions"] + ["strided_downsample"] * (graph == "vae_encoder")
                 + ["shortcuts_in_weights"] + ["fused_output_norm"] * (graph == "vae_decoder"))
        assert m["graphs"][graph]["artifacts"]["openvino/fp32"]["graph_forms"] == forms
        # shortcuts_in_weights took the blocks' shortcuts it folds into their convs' weights: the shortcut
        # convolutions left are the others' and the latent's (the decoder's input copy, the encoder's output average)
        half = getattr(ae, graph.split("_")[1])
        kept = [m for m in half.modules() if shortcut_convolution(m) and not folds_shortcut(m)]
        assert len(kept) < sum(1 for m in half.modules() if shortcut_convolution(m)), graph  # some folded
        assert len(shortcut_convolutions(openvino.Core().read_model(str(out / graph / "openvino_model.xml")))) == len(kept), graph
        moved = re.findall(r'name="([^"]+)" type="(?:Transpose|VariadicSplit|Split|Tile)"', xml)
        # ... but the two around the decoder's output norm (graph form fused_output_norm)
        assert sum("norm_out" in n for n in moved) == 2 * (graph == "vae_decoder"), (graph, moved)
        assert all(n.endswith("attn/prim::ListUnpack/VariadicSplit") for n in moved if "norm_out" not in n), (graph, moved)
        # ... which the CPU plugin fuses into its RMS op (f32 inside, also under bf16); the blocks' norms stay unfused
        runtime = openvino.Core().compile_model(str(out / graph / "openvino_model.xml"), "CPU").get_runtime_model()
        fused = [op for op in runtime.get_ops() if op.get_rt_info()["layerType"].astype(str) == "RMS"]
        assert len(fused) == (graph == "vae_decoder"), (graph, [op.get_friendly_name() for op in fused])
        means = re.findall(r'name="([^"]+)" type="ReduceMean"', xml)  # the RMSNorms' only: no shortcut average
        assert means and all(".norm" in n for n in means), (graph, means)
    assert m["graphs"]["transformer"]["artifacts"]["openvino/fp32"]["graph_forms"] == []  # no block to swap: none recorded


@pytest.mark.parametrize("cfg_fn", [tiny_edge_f64, tiny_sana], ids=["edge-f64", "sana-multiscale"])
def test_graph_forms_compute_the_model_values_and_leave_the_model_as_it_was(cfg_fn):
    """export.graph_forms (OpenVINO's 1x1-conv projections, GLUMBConv halves from weight slices, shortcuts as
    constant-weight convolutions, conv3x3 + pixel_unshuffle as one strided conv, block shortcuts in their convs'
    weights, the decoder's output norm channels-last; ExecuTorch's RMSNorm channel mean as a convolution): the same values as the model's own forms, every LiteMLA/GLUMBConv/shortcut switched, and afterwards
    (also after a failure inside) the model is the one ExecuTorch and ONNX export, bit for bit."""
    import torch

    from dcae_edge.autoencoder import GLUMBConv, LiteMLA, RMSNorm2d
    from export.graph_forms import FORMS, folds_shortcut, graph_forms, shortcut_convolution, strides_cheaply

    model = make_model(cfg_fn(), seed=3)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        with graph_forms(model, tuple(FORMS)) as switched:
            inside = model(x)
        after = model(x)
        with pytest.raises(RuntimeError, match="tracing failed"), graph_forms(model, ("glu_halves",)):
            raise RuntimeError("tracing failed")
        again = model(x)
        with graph_forms(model, ("glu_slices",)) as sliced_blocks:  # ExecuTorch's fp32 programs: the same values, bit for bit
            sliced = model(x)
    assert sliced_blocks == sum(isinstance(m, GLUMBConv) for m in model.modules()) > 0 and torch.equal(sliced, before)
    shortcuts = [m for m in model.modules() if shortcut_convolution(m)]
    unshuffles = [m for m in model.modules() if strides_cheaply(m)]
    folded = [m for m in model.modules() if folds_shortcut(m)]
    norms = sum(isinstance(m, RMSNorm2d) for m in model.modules())
    assert norms and switched == sum(isinstance(m, (LiteMLA, GLUMBConv)) for m in model.modules()) + len(shortcuts) \
        + len(unshuffles) + len(folded) + norms + 1  # + the decoder's output norm, channels-last
    assert {type(m).__name__ for m in folded} == ({"UpBlock", "DownBlock"} if cfg_fn is tiny_edge_f64 else {"DownBlock"})
    assert bool(unshuffles) == (cfg_fn is tiny_edge_f64)
    assert {type(m).__name__ for m in shortcuts} >= {"UpBlock", "DownBlock"} and any(isinstance(m, LiteMLA) for m in model.modules())
    assert (inside - before).abs().max() < 1e-5 * before.abs().max()
    assert torch.equal(after, before) and torch.equal(again, before)
    swappable = {"project", "value_and_gate", "duplicate_channels", "space_to_channel_average", "channel_average", "downsample", "forward",
                 "mean_square"}
    assert not any(swappable & set(vars(m)) for m in model.modules())
    with pytest.raises(ValueError, match="unknown graph forms"), graph_forms(model, ("channels_last",)):
        pass


@pytest.mark.parametrize("c_in,c_out", [(8, 16), (8, 8), (16, 8), (8, 32)])
def test_shortcut_convolutions_are_the_shortcuts(c_in, c_out):
    """The constant-weight convolutions of export.graph_forms against the model's shortcuts: each group
    size (averaging 1, 2, 4 or 8 unshuffled channels), the latent average (factor 1), the copy."""
    import torch

    from dcae_edge.autoencoder import channel_average, duplicate_channels, space_to_channel_average
    from export.graph_forms import average_by_convolution, duplicate_by_convolution

    x = torch.randn(2, c_in, 6, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(average_by_convolution(x, c_out), space_to_channel_average(x, c_out), rtol=0, atol=1e-6)
    if c_out <= c_in:
        torch.testing.assert_close(average_by_convolution(x, c_out, factor=1), channel_average(x, c_out), rtol=0, atol=1e-6)
    assert torch.equal(duplicate_by_convolution(x, 3), duplicate_channels(x, 3))


def test_strided_downsample_is_the_down_block_and_only_for_narrow_blocks():
    """conv3x3 + pixel_unshuffle as one 4x4 stride-2 conv: the same values; only where its 64/9 times larger
    weights stay small (the narrow high-resolution blocks), so the IR does not grow by several MB."""
    import torch

    from dcae_edge.autoencoder import DownBlock
    from export.graph_forms import STRIDED_MAX_WEIGHTS, strided_downsample, strides_cheaply

    torch.manual_seed(0)
    narrow, wide = DownBlock(32, 64, pixel_unshuffle=True, shortcut=True), DownBlock(128, 256, pixel_unshuffle=True, shortcut=True)
    x = torch.randn(2, 32, 12, 20)
    with torch.no_grad():
        torch.testing.assert_close(strided_downsample(narrow, x), narrow.downsample(x), rtol=0, atol=1e-5)
    assert strides_cheaply(narrow) and not strides_cheaply(wide)  # 4*64*128*16 weights > STRIDED_MAX_WEIGHTS
    assert 4 * 64 * 128 * 16 > STRIDED_MAX_WEIGHTS >= 4 * 16 * 32 * 16
    assert not strides_cheaply(DownBlock(32, 64, pixel_unshuffle=False, shortcut=True))  # a stride-2 conv already


def test_shortcuts_in_weights_are_the_blocks():
    """An up block's copy shortcut in its conv's centre tap, a down block's average in its stride-2 weights (the
    4x4 strided form, SANA's 3x3 stride-2 conv): the blocks' values. Not where the shortcut depends on the
    sub-pixel (a nearest-upsampled up block), the learned path is not strided (a wide pixel_unshuffle block), or
    the weights are so small that the added value would leave INT8 few bits for them."""
    import torch

    from dcae_edge.autoencoder import DownBlock, UpBlock
    from export.graph_forms import (FOLD_MAX_STEP_GROWTH, down_with_shortcut_in_weights, fold_step_growth, folds_shortcut,
                                    up_with_shortcut_in_weights)

    def trained(block):  # weights of a trained block's size (default init here: |w| < 1/sqrt(9 * 32) = 0.059)
        with torch.no_grad():
            block.conv.weight.mul_(3)
        return block

    torch.manual_seed(0)
    x = torch.randn(2, 32, 12, 20)
    with torch.no_grad():
        for c_out in (16, 32, 64):  # copies: 8, 4, 2 per input channel (the pixel_shuffle's 4x the output channels)
            up = trained(UpBlock(32, c_out, interpolate=False, shortcut=True))
            assert folds_shortcut(up)
            torch.testing.assert_close(up_with_shortcut_in_weights(up, x), up(x), rtol=0, atol=1e-5)
        for c_out in (32, 64, 128):  # the average over 4, 2 and 1 unshuffled channels
            for unshuffle in (True, False):
                down = trained(DownBlock(32, c_out, pixel_unshuffle=unshuffle, shortcut=True))
                assert folds_shortcut(down)
                torch.testing.assert_close(down_with_shortcut_in_weights(down, x), down(x), rtol=0, atol=1e-5)
    assert not folds_shortcut(trained(UpBlock(32, 16, interpolate=True, shortcut=True)))
    assert not folds_shortcut(trained(DownBlock(128, 256, pixel_unshuffle=True, shortcut=True)))  # wide: no strided form
    assert not folds_shortcut(trained(UpBlock(32, 16, interpolate=False, shortcut=False)))
    # INT8's per-channel weight step: an added 1 over weights of at most ~0.06 would make it ~18x coarser
    tiny = UpBlock(32, 16, interpolate=False, shortcut=True)
    assert fold_step_growth(tiny) > FOLD_MAX_STEP_GROWTH and not folds_shortcut(tiny)


def test_benchmark_breakdown_sums_the_performance_counters_and_bounds_int8(f64_files):
    """scripts/bench_int8.py's breakdown: per kind of op, the CPU plugin's node times of one run add up
    to its total, the convolutions count as compute, and INT8's ceiling over bf16 lies in (1, 2]."""
    import importlib.util
    from pathlib import Path

    out = f64_files / "bundle"
    if not (out / "manifest.json").is_file():  # this file's first test writes it; alone, export it here
        from export import openvino as ov

        ov.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", "none", "--out", str(out),
                 "--resolution", "128", "--graphs", "vae_decoder"])
    spec = importlib.util.spec_from_file_location("bench_int8", Path(__file__).parents[1] / "scripts" / "bench_int8.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert [bench.op_kind(t) for t in ("Convolution", "FullyConnectedQuantizedLegacy", "Reorder", "DepthToSpace",
                                       "FakeQuantize", "Multiply")] == ["compute", "compute", "layout", "layout", "quantize", "other"]
    m = json.loads((out / "manifest.json").read_text())
    z = np.random.default_rng(0).standard_normal((1, 128, 2, 2)).astype(np.float32)
    rows = bench.breakdown(m, out, "vae_decoder", {"latent_sample": z}, runs=2)
    assert rows and rows[0]["precision"] == "f32"
    for r in rows:
        parts = r["compute_ms"] + r["layout_ms"] + r["quantize_ms"] + r["other_ms"]
        assert r["compute_ms"] > 0 and abs(parts - r["total_ms"]) < 0.05, r
        # export.graph_forms' shortcut convolutions (never quantized) count as layout, not as compute INT8 could speed up
        assert 0 < r["shortcut_ms"] <= r["layout_ms"], r
    for r in (r for r in rows if r["precision"] == "bf16"):
        assert 1 < r["int8_ceiling_vs_bf16"] <= 2


def test_large_graphs_convert_through_onnx_after_freeing_torch_weights(f64_files, capsys):
    """Above --lean-above, a graph is exported to a temporary ONNX file (dynamo, external data), its torch
    weights are freed, and OpenVINO converts the file: forced here on a tiny model; parity unchanged."""
    from export import openvino as ov

    out = f64_files / "lean"
    ov.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", "none", "--out", str(out),
             "--resolution", "128", "--graphs", "vae_decoder", "--lean-above", "0"])
    said = capsys.readouterr().out
    assert "through ONNX: dynamo, external data" in said and "torch weights released before conversion" in said
    m = json.loads((out / "manifest.json").read_text())
    art = m["graphs"]["vae_decoder"]["artifacts"]["openvino/fp32"]
    assert art["converted_from"].startswith("onnx") and art["validation"]["pass"] and len(art["validation"]["results"]) == 2
    assert all(r["max_abs"] <= 1e-4 for r in art["validation"]["results"])
    assert art["runtime_options"] == {"ACTIVATIONS_SCALE_FACTOR": "8.0"}
    assert sorted(p.name for p in (out / "vae_decoder").iterdir()) == ["openvino_model.bin", "openvino_model.xml"]  # no ONNX left


@pytest.mark.parametrize("cfg_fn", [tiny_in_mix, tiny_sana], ids=["in-mix", "sana"])
def test_openvino_families_on_real_photos(cfg_fn, tmp_path):
    import openvino as ov

    from export.common import validate
    from export.openvino import convert_graph, ov_runner
    from export.specs import vae_decoder_spec, vae_encoder_spec

    model = make_model(cfg_fn(), seed=2)
    core = ov.Core()
    for spec in (vae_encoder_spec(model, 128), vae_decoder_spec(model, 128)):
        unit = 128 // spec.spatial_scale
        ir, _ = convert_graph(spec, {"batch": 1, "height": unit, "width": unit}, dynamic=True)
        run, executed = ov_runner(core, ir, spec, "f32")
        v = validate(spec, run, [{"batch": 1, "height": unit, "width": unit}], "fp32", "openvino f32")
        assert v["pass"] and executed == "f32"


def test_one_bundle_holds_onnx_openvino_and_coreml(f64_files, tmp_path):
    from export import coreml, onnx, openvino

    out = tmp_path / "bundle"
    args = ["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", "none", "--out", str(out),
            "--resolution", "128", "--graphs", "vae_decoder"]
    onnx.main(args + ["--static"])
    openvino.main(args + ["--static"])
    coreml.main(args + ["--quantize-weights", "int8"])
    m = json.loads((out / "manifest.json").read_text())
    arts = m["graphs"]["vae_decoder"]["artifacts"]
    assert {"onnx/fp32", "openvino/fp32", "coreml/fp16", "coreml/int8w"} <= set(arts)
    for rel, meta in m["files"].items():
        assert sha256_file(out / rel) == meta["sha256"], rel
    checks = arts["coreml/fp16"]["spec_checks"]
    assert [r["name"] for r in checks["inputs"]] == ["latent_sample"] and checks["inputs"][0]["shape"] == [1, 128, 2, 2]
    assert [r["name"] for r in checks["outputs"]] == ["sample"] and checks["outputs"][0]["shape"] == [1, 3, 128, 128]
    assert arts["coreml/int8w"]["spec_checks"]["ops"].get("weights", 0) > 0  # int8 weights really present
    ops = checks["ops"]
    assert ops.get("fp32", 0) > 0 and ops.get("fp16", 0) > 0  # delicate ops kept fp32 inside an fp16 program
    pkg = out / "vae_decoder" / "model.mlpackage"
    assert pkg.is_dir() and (pkg / "Manifest.json").is_file()


def test_coreml_package_spec_and_metadata(f64_files, tmp_path):
    import coremltools as ct

    from export import coreml

    out = tmp_path / "bundle"
    coreml.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser",
                 str(f64_files / "dn.safetensors"), "--out", str(out), "--resolution", "128"])
    for graph, ins, outs in (("vae_encoder", ["sample"], ["latent_sample"]), ("vae_decoder", ["latent_sample"], ["sample"]),
                             ("transformer", ["hidden_states", "timestep", "class_labels"], ["sample"])):
        spec = ct.models.MLModel(str(out / graph / "model.mlpackage"), skip_model_load=True).get_spec()
        assert [i.name for i in spec.description.input] == ins
        assert [o.name for o in spec.description.output] == outs
        meta = dict(spec.description.metadata.userDefined)
        assert "scaling_factor" in json.dumps(meta) or "scaling_factor" in meta
    dec = ct.models.MLModel(str(out / "vae_decoder" / "model.mlpackage"), skip_model_load=True).get_spec()
    assert list(dec.description.input[0].type.multiArrayType.shape) == [1, 128, 2, 2]


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction only runs on macOS")
def test_coreml_prediction_parity_on_macos(f64_files, tmp_path):
    from export import coreml

    out = tmp_path / "bundle"
    coreml.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", "none",
                 "--out", str(out), "--resolution", "128"])
    m = json.loads((out / "manifest.json").read_text())
    for graph in ("vae_encoder", "vae_decoder"):
        v = m["graphs"][graph]["artifacts"]["coreml/fp16"]["validation"]
        assert v["pass"] and all(r["psnr"] >= 40 for r in v["results"])


def test_coreml_runtime_refuses_unexported_resolution(f64_files, tmp_path):
    from export import coreml
    from runtimes import BundleError, RuntimeUnavailable, open_bundle

    out = tmp_path / "bundle"
    coreml.main(["--variant", "f64", "--weights", str(f64_files / "ae.safetensors"), "--denoiser", "none",
                 "--out", str(out), "--resolution", "128", "256", "--graphs", "vae_encoder"])
    m = json.loads((out / "manifest.json").read_text())
    from dcae_edge import load_autoencoder
    from export.specs import vae_encoder_spec

    # the graph-level attention branches stay those of the bundle resolution (128), not the extra 256
    assert m["graphs"]["vae_encoder"]["attention_stages"] == vae_encoder_spec(
        load_autoencoder(f64_files / "ae.safetensors"), 128).attention_stages
    assert m["graphs"]["vae_encoder"]["artifacts"]["coreml/fp16@256"]["resolution"] == 256
    pipe = open_bundle(out, backend="coreml", precision="fp16")
    with pytest.raises(BundleError, match="no Core ML package for 192px; this bundle has 128, 256px"):
        pipe._artifact("vae_encoder", 192)
    if platform.system() != "Darwin":
        with pytest.raises(RuntimeUnavailable, match="macOS"):
            pipe.encode(np.zeros((128, 128, 3), np.uint8))

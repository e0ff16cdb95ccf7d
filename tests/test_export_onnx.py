"""ONNX export: every family, real-photo parity in onnxruntime, dynamic shapes, quadratic branch,
the eps-folding NaN regression, manifests, atomic bundles and bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import make_model, tiny_edge_f64, tiny_in_mix, tiny_sana
from dcae_edge.autoencoder import linear_attention
from dcae_edge.data import sample_photos
from export import onnx as ex
from export.bundle import sha256_file
from export.common import ExportError, validate
from export.specs import vae_decoder_spec, vae_encoder_spec


def export_and_check(model, res, dynamic, tmp_path):
    results = []
    for spec in (vae_encoder_spec(model, res), vae_decoder_spec(model, res)):
        path = tmp_path / f"{spec.name}.onnx"
        info = ex.export_graph(spec, path, ex.export_sizes(spec, res, dynamic), dynamic, 18, "dynamo")
        onnx.checker.check_model(str(path))
        ex.simplify(path, "onnxslim")
        v = validate(spec, ex.ort_runner(path), ex.validation_sizes(spec, res, dynamic), "fp32", "ort")
        assert v["pass"], v
        results.append((spec, v, info))
    return results


@pytest.mark.parametrize("cfg_fn,res,dynamic", [
    (tiny_in_mix, 128, True),                                  # BatchNorm + pixel-(un)shuffle family
    (tiny_sana, 128, True),                                    # conv / interpolate + 5x5 multi-scale attention
    (lambda: tiny_in_mix(latent=16, stages=5), 64, False),     # 4x4 deepest stage: quadratic branch
], ids=["in-mix", "sana", "quadratic-static"])
def test_onnx_parity_on_real_photos(cfg_fn, res, dynamic, tmp_path):
    model = make_model(cfg_fn(), seed=1)
    for spec, v, info in export_and_check(model, res, dynamic, tmp_path):
        shapes = [r["sizes"] for r in v["results"]]
        if dynamic:  # a second, unseen batch and non-square resolution was checked
            assert len(shapes) == 2 and shapes[1]["batch"] == 3 and shapes[1]["height"] != shapes[1]["width"]
        if not spec.attention_stages[-1]["linear"]:
            assert cfg_fn is not tiny_sana  # only the quadratic case takes this branch
        assert all(r["max_abs"] <= 1e-4 and r["nonfinite"] == 0 for r in v["results"])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pixel_unshuffle_exports_as_space_to_depth(exporter, tmp_path):
    """pixel_unshuffle becomes SpaceToDepth + a transpose of whole planes, not a 6-D transpose (that was
    42 of 103 ms of the f64 encoder in onnxruntime), with either exporter and after onnxslim (whose
    shape inference miscounts SpaceToDepth's channels); torch parity at an unseen batch and shape."""
    model = make_model(tiny_in_mix(), seed=1)
    spec = vae_encoder_spec(model, 128)
    path = tmp_path / "encoder.onnx"
    ex.export_graph(spec, path, ex.export_sizes(spec, 128, True), True, 18, exporter)
    ex.simplify(path, "onnxslim")
    graph = onnx.load(str(path)).graph
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert any(n.op_type == "SpaceToDepth" for n in graph.node) and not [p for p in perms if len(p) == 6], perms
    v = validate(spec, ex.ort_runner(path), ex.validation_sizes(spec, 128, True), "fp32", "ort")
    assert v["pass"] and len(v["results"]) == 2 and all(r["max_abs"] <= 1e-4 for r in v["results"]), v


def test_linear_attention_never_divides_zero_by_zero_in_onnx(tmp_path):
    """Regression: dynamo's optimizer deletes `x + 1e-15`; an all-zero ReLU query column then gives
    0/0 = NaN in onnxruntime. Our clamp_min form must survive export and stay finite."""
    import onnxruntime as ort

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return linear_attention(q, k, v)

    q = torch.rand(1, 2, 8, 64)
    q[..., :5] = 0  # tokens whose ReLU'd query is all zero: numerator and denominator are exactly 0
    k, v = torch.rand(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(Attn(), (q, k, v), str(path), dynamo=True, opset_version=18, external_data=False)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {
        i.name: t.numpy() for i, t in zip(ort.InferenceSession(str(path)).get_inputs(), (q, k, v))})[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, linear_attention(q, k, v).numpy(), atol=1e-5)
    assert any(n.op_type in ("Clip", "Max") for n in onnx.load(str(path)).graph.node)


def test_real_photos_stay_finite_where_noise_would_hide_nan(tmp_path):
    """Exported encoder on real photos (dark/flat regions drive ReLU'd queries to zero)."""
    model = make_model(tiny_in_mix(), seed=4)
    spec = vae_encoder_spec(model, 128)
    path = tmp_path / "enc.onnx"
    ex.export_graph(spec, path, ex.export_sizes(spec, 128, True), True, 18, "dynamo")
    dark = (sample_photos(128, 2) * 0.1 - 0.9).numpy()  # nearly black photos
    out = ex.ort_runner(path)({"sample": dark})[0]
    assert np.isfinite(out).all()


def cli(args):
    return ex.main(args)


def test_cli_bundle_manifest_and_checksums(tmp_path, tiny_f64_file):
    out = tmp_path / "bundle"
    cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128", "--denoiser", "none"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "dcae-edge-bundle" and m["variant"] == "f64" and m["resolution"] == 128
    assert m["autoencoder"]["random_weights"] is False and m["autoencoder"]["scaling_factor"] == 1.0
    for graph in ("vae_encoder", "vae_decoder"):
        art = m["graphs"][graph]["artifacts"]["onnx/fp32"]
        assert art["validation"]["pass"] and art["opset"] == 18 and art["exporter"] == "torchscript"
        assert art["nodes_after"] <= art["nodes_before"]
    names = {g: [t["name"] for t in m["graphs"][g]["inputs"] + m["graphs"][g]["outputs"]] for g in m["graphs"]}
    assert names == {"vae_encoder": ["sample", "latent_sample"], "vae_decoder": ["latent_sample", "sample"]}
    for rel, meta in m["files"].items():
        assert sha256_file(out / rel) == meta["sha256"]
    g = onnx.load(str(out / "vae_encoder" / "model.onnx")).graph
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert [d.dim_param for d in g.output[0].type.tensor_type.shape.dim][2:] == ["height / 64", "width / 64"]


def test_fp16_graph_keeps_delicate_ops_fp32_and_passes_psnr(tmp_path, tiny_f64_file):
    out = tmp_path / "bundle"
    try:
        cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128", "--static",
             "--fp16", "--graphs", "vae_decoder", "--denoiser", "none"])
    except ExportError as e:
        pytest.fail(f"fp16 export failed: {e}")
    m = json.loads((out / "manifest.json").read_text())
    art = m["graphs"]["vae_decoder"]["artifacts"]["onnx/fp16"]
    assert art["validation"]["pass"] and art["validation"]["results"][0]["psnr"] >= 40
    half = onnx.load(str(out / "vae_decoder" / "model_fp16.onnx"))
    fp16_inits = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    assert fp16_inits > 0 and (out / "vae_decoder" / "model_fp16.onnx").stat().st_size < \
        0.7 * (out / "vae_decoder" / "model.onnx").stat().st_size


def test_failed_export_leaves_previous_bundle_intact(tmp_path, tiny_f64_file, monkeypatch):
    out = tmp_path / "bundle"
    cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128", "--static",
         "--graphs", "vae_decoder", "--denoiser", "none"])
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of an export

    monkeypatch.setattr(ex, "simplify", boom)
    with pytest.raises(KeyboardInterrupt):
        cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128", "--static",
             "--graphs", "vae_decoder", "--denoiser", "none"])
    after = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    # no staging left (the hidden .bundle.lock stays: removing a lock file races with a waiting writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle", "tiny-f64.safetensors"]


def test_validation_failure_exits_nonzero_and_writes_nothing(tmp_path, tiny_f64_file, monkeypatch):
    from export.common import run_cli
    from export.specs import IMAGE_TOLERANCES, Tolerance

    monkeypatch.setitem(IMAGE_TOLERANCES, "fp32", Tolerance(max_abs=0.0))  # impossible
    out = tmp_path / "bundle"
    rc = run_cli(ex.main, ["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128",
                           "--static", "--graphs", "vae_decoder", "--denoiser", "none"])
    assert rc == 1 and not out.exists()


@pytest.mark.parametrize("args,match", [
    (["--variant", "f65"], "unknown --variant"),
    (["--variant", "f32"], "f64c128 model .* but --variant f32 expects f32c32"),
    (["--variant", "f64", "--resolution", "100"], "not a positive multiple of the compression factor 64"),
    (["--variant", "f64", "--opset", "17", "--exporter", "dynamo"], "dynamo exporter only writes opset >= 18"),
])
def test_bad_arguments_are_refused(args, match, tmp_path, tiny_f64_file):
    full = args + ["--weights", str(tiny_f64_file), "--out", str(tmp_path / "b"), "--denoiser", "none"]
    with pytest.raises(ExportError, match=match):
        cli(full)
    assert not (tmp_path / "b").exists()


def test_foreign_output_folder_is_refused(tmp_path, tiny_f64_file):
    from export.bundle import BundleError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my files")
    with pytest.raises(BundleError, match="not a dcae-edge bundle"):
        cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(tmp_path / "mine"), "--denoiser", "none"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my files"


def test_dynamic_graph_refuses_sizes_that_flip_an_attention_branch(tmp_path):
    spec = vae_encoder_spec(make_model(tiny_edge_f64()), 512)  # 8x8 deepest stage: linear
    spec.check_shape_supported(448, 576)
    with pytest.raises(ValueError, match="switch attention branch"):
        spec.check_shape_supported(256, 256)  # 4x4 deepest stage: quadratic in torch


def test_paper_size_graphs_check_dynamic_shapes_at_a_small_unseen_size():
    """Each paper-size image costs seconds and gigabytes: the unseen-size check uses the smallest
    non-square size (aspect <= 2) whose attention stages keep their export branch."""
    import torch

    from dcae_edge.checkpoints import build_autoencoder

    with torch.device("meta"):  # the architecture only: no 677 M weights in memory
        ae = build_autoencoder("dc-ae-f64c128-in-1.0")
    dec, enc = vae_decoder_spec(ae, 512), vae_encoder_spec(ae, 512)
    assert ex.validation_sizes(dec, 512, True) == [{"batch": 1, "height": 8, "width": 8}, {"batch": 1, "height": 5, "width": 7}]
    assert ex.validation_sizes(enc, 512, True)[1] == {"batch": 1, "height": 320, "width": 448}
    for spec, (h, w) in ((dec, (5, 7)), (enc, (320, 448))):
        spec.check_shape_supported(h, w)
        with pytest.raises(ValueError, match="switch attention branch"):  # one cell smaller flips the deepest stage
            spec.check_shape_supported(h - spec.meta["spatial_compression"] // spec.spatial_scale, w)
    small = vae_decoder_spec(make_model(tiny_edge_f64()), 512)  # small models keep the batch-3 check near 512
    assert ex.validation_sizes(small, 512, True)[1] == {"batch": 3, "height": 7, "width": 9}


def test_decoder_only_export_releases_the_encoder_after_computing_its_examples():
    from export.common import build_specs, release_unused_encoder

    model = make_model(tiny_edge_f64(), seed=0)
    specs = build_specs(model, None, 128, ["vae_decoder"])
    encoded = []
    model.encoder.register_forward_hook(lambda mod, inp, out: encoded.append(inp[0].shape[0]))
    assert release_unused_encoder(model, specs, 128, dynamic=True)
    assert all(p.is_meta for p in model.encoder.parameters())
    dec = specs[0]
    validation = ex.validation_sizes(dec, 128, True)
    assert sum(encoded) == sum(v["batch"] for v in validation)  # the batch-2 trace input encodes nothing extra
    assert np.isfinite(dec.trace_inputs(ex.export_sizes(dec, 128, True))["latent_sample"]).all()  # cached
    for sizes in validation:  # cached: no encoder needed
        assert np.isfinite(dec.examples(sizes)["latent_sample"]).all() and dec.reference(sizes)[0].shape[0] == sizes["batch"]
    # an encoder export keeps its encoder
    model2 = make_model(tiny_edge_f64(), seed=0)
    assert not release_unused_encoder(model2, build_specs(model2, None, 128, None), 128, dynamic=True)
    assert not any(p.is_meta for p in model2.encoder.parameters())


def test_smaller_decoder_examples_are_windows_of_an_encoded_photo_latent():
    """The paper-size check at 5x7 cells reuses the 8x8 latent of the 512px photo (a window of a real
    latent): one encoder pass instead of two (~10 s at paper size). A larger size still encodes."""
    from export.specs import vae_decoder_spec

    model = make_model(tiny_edge_f64(), seed=0)
    dec = vae_decoder_spec(model, 512)
    calls = []
    model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    full = dec.examples({"batch": 1, "height": 8, "width": 8})["latent_sample"]
    window = dec.examples({"batch": 1, "height": 5, "width": 7})["latent_sample"]
    assert len(calls) == 1 and window.shape[2:] == (5, 7) and window.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(window, full[:, :, 1:6, 0:7])
    assert dec.examples({"batch": 1, "height": 9, "width": 9})["latent_sample"].shape[2:] == (9, 9)
    assert dec.examples({"batch": 3, "height": 5, "width": 5})["latent_sample"].shape[0] == 3
    assert len(calls) == 3  # another batch or a larger size: a real encoder pass


def test_dynamo_export_leaves_no_reference_to_the_torch_weights(tmp_path):
    """After a dynamo export, releasing the module's weights frees them (onnxscript's rewrite rules
    kept the last graph they matched, and with it every weight: the paper decoder's 1.65 GB stayed)."""
    import gc
    import weakref

    from export.specs import vae_decoder_spec

    spec = vae_decoder_spec(make_model(tiny_edge_f64(), seed=3), 128)
    weight = weakref.ref(next(spec.module.parameters()))
    ex.export_graph(spec, tmp_path / "model.onnx", ex.export_sizes(spec, 128, True), True, 18, "dynamo", lean_above_mb=0)
    spec.module.to("meta")
    gc.collect()
    assert weight() is None


def test_large_graphs_export_lean_with_external_data(tmp_path, tiny_f64_file, capsys):
    """Above --external-data-above, a graph streams its weights into one .data file (dynamo), skips the
    simplifier and validates after its torch weights are freed; forced here on a tiny model."""
    out = tmp_path / "bundle"
    cli(["--variant", "f64", "--weights", str(tiny_f64_file), "--out", str(out), "--resolution", "128", "--denoiser", "none",
         "--graphs", "vae_decoder", "--external-data-above", "0"])
    said = capsys.readouterr().out
    assert "streams them into one external-data file" in said and "torch weights released" in said
    m = json.loads((out / "manifest.json").read_text())
    art = m["graphs"]["vae_decoder"]["artifacts"]["onnx/fp32"]
    assert art["exporter"] == "dynamo" and art["external_data"] and art["simplifier"] == "skipped (external data)"
    assert art["validation"]["pass"] and len(art["validation"]["results"]) == 2
    assert "vae_decoder/model.onnx.data" in m["files"]
    weights = onnx.load(str(out / "vae_decoder" / "model.onnx"), load_external_data=False).graph.initializer
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in weights) > 0

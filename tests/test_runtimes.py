"""App runtimes: torch-free encode/decode/generate from a bundle, parity suite against a torch
reference, tiling, tampering and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, make_model, tiny_denoiser, tiny_edge_f64
from dcae_edge.checkpoints import save_autoencoder
from dcae_edge.data import sample_photos
from dcae_edge.denoiser import save_denoiser


def tiny_f64_head4():
    cfg = tiny_edge_f64()
    cfg.attention_head_dim = 4  # at 256px every attention stage is linear, also at 512px (tiling test)
    cfg.name = "tiny-edge-f64c128-h4"
    return cfg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A dynamic 256px bundle (ONNX + OpenVINO) with a denoiser, and a CPU torch reference."""
    from export import onnx as ex
    from export import openvino as ov
    from runtimes.reference import make_reference, save_reference

    d = tmp_path_factory.mktemp("rt")
    save_autoencoder(make_model(tiny_f64_head4(), seed=2), d / "ae.safetensors")
    save_denoiser(tiny_denoiser(input_size=4), d / "dn.safetensors")
    args = ["--variant", "f64", "--weights", str(d / "ae.safetensors"), "--denoiser", str(d / "dn.safetensors"),
            "--out", str(d / "b"), "--resolution", "256"]
    ex.main(args)
    ov.main(args)
    tensors, meta = make_reference(str(d / "ae.safetensors"), str(d / "dn.safetensors"), 256, "cpu")
    save_reference(tensors, meta, d / "ref.safetensors")
    return d


def test_torch_free_encode_decode_generate(bundle):
    """The app API with torch made unimportable: encode, decode and generate from the bundle."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from runtimes import open_bundle, load_image, to_pil
        pipe = open_bundle(r"{bundle / 'b'}")
        x = load_image(r"{ROOT / 'dcae_edge/assets/astronaut.jpg'}", size=256)
        z = pipe.encode(x)
        y = pipe.decode(z)
        g = pipe.generate([0, 2], steps=4, cfg_scale=3.0, seed=1)
        assert z.shape == (1, 128, 4, 4) and y.shape == (1, 3, 256, 256) and g.shape == (2, 3, 256, 256)
        assert np.isfinite(y).all() and np.isfinite(g).all()
        to_pil(g)[0].save(r"{bundle / 'gen.png'}")
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] == 'torch']
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_openvino_compiles_a_dynamic_ir_per_input_shape(bundle, monkeypatch):
    """A dynamic IR runs compiled for the shapes it is fed (the CPU plugin's static kernels): one compile per
    shape, reused, the oldest dropped past STATIC_SHAPES, the same values as the dynamic model; large weights
    (over STATIC_MAX_WEIGHTS_MB) compile the dynamic model once instead."""
    from runtimes import backends

    xml = bundle / "b" / "vae_decoder" / "openvino_model.xml"
    dynamic = backends.OpenVinoGraph(xml, static=False)
    static = backends.OpenVinoGraph(xml)
    assert static.per_shape and not dynamic.per_shape
    rng = np.random.default_rng(0)
    shapes = [(1, 128, 4, 4), (2, 128, 4, 4), (1, 128, 4, 6), (1, 128, 6, 4), (1, 128, 6, 6)]
    for i, shape in enumerate(shapes):
        z = rng.standard_normal(shape).astype(np.float32)
        got, want = static.run({"latent_sample": z})[0], dynamic.run({"latent_sample": z})[0]
        assert got.shape == want.shape == (shape[0], 3, shape[2] * 64, shape[3] * 64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert len(static._by_shape) == min(i + 1, backends.STATIC_SHAPES)
    static.run({"latent_sample": z})  # the newest shape again: no new compile
    assert len(static._by_shape) == backends.STATIC_SHAPES and next(reversed(static._by_shape))[0] == shapes[-1]
    assert (1, 128, 4, 4) not in {k[0] for k in static._by_shape}  # the oldest went first
    monkeypatch.setattr(backends, "STATIC_MAX_WEIGHTS_MB", 0)
    assert not backends.OpenVinoGraph(xml).per_shape


def test_parity_suite_passes_for_ort_and_openvino_against_cpu_reference(bundle, tmp_path):
    from runtimes.parity import main, run_parity

    report = run_parity(bundle / "b", bundle / "ref.safetensors")
    rows = {(r["graph"], r.get("backend"), r.get("precision")): r for r in report["rows"]}
    for graph in ("vae_encoder", "vae_decoder", "transformer"):
        for backend in ("onnxruntime", "openvino"):
            r = rows[(graph, backend, "fp32")]
            assert r["status"] == "pass" and r["nonfinite"] == 0, r
        assert rows[(graph, "openvino", "bf16")]["psnr"] >= 35  # reported against its own threshold
    assert rows[("generate (end to end)", "onnxruntime", "fp32")]["status"] == "pass"
    assert report["pass"]
    assert main(["--bundle", str(bundle / "b"), "--reference", str(bundle / "ref.safetensors"), "--out",
                 str(tmp_path / "p")]) == 0
    assert "| vae_decoder | onnx/fp32 | onnxruntime | fp32 |" in (tmp_path / "p.md").read_text()


def test_runtime_matches_torch_sampler(bundle):
    from dcae_edge.denoiser import load_denoiser
    from dcae_edge.sample import generate_latents
    from runtimes import open_bundle

    dn, _ = load_denoiser(bundle / "dn.safetensors")
    ref = generate_latents(dn, [1, 2], steps=5, cfg_scale=2.0, seed=4).numpy()
    _, lat = open_bundle(bundle / "b").generate([1, 2], steps=5, cfg_scale=2.0, seed=4, return_latents=True)
    np.testing.assert_allclose(lat, ref, atol=1e-4)


def test_tiling_is_exact_for_local_operators():
    from runtimes.tiling import tiled_apply

    x = np.random.default_rng(0).standard_normal((2, 3, 24, 40)).astype(np.float32)
    up = lambda t: np.repeat(np.repeat(t * 2.0, 4, axis=2), 4, axis=3)  # noqa: E731  local "decoder", x4
    np.testing.assert_allclose(tiled_apply(up, x, tile=8, overlap=2, scale=4), up(x), rtol=1e-6)
    down = lambda t: t.reshape(2, 3, t.shape[2] // 4, 4, t.shape[3] // 4, 4).mean((3, 5))  # noqa: E731  local "encoder"
    np.testing.assert_allclose(tiled_apply(down, x, tile=8, overlap=4, scale=0.25), down(x), rtol=1e-5)


def test_tiled_matches_untiled_with_the_bundled_model(tmp_path):
    """Where the untiled decode fits, tiles of the exported size give >= 40 dB of it (trained f64)."""
    from dcae_edge.checkpoints import bundled_weights_path
    from export import onnx as ex
    from runtimes import open_bundle

    if bundled_weights_path("f64") is None:
        pytest.skip("no bundled f64 weights in this checkout")
    ex.main(["--variant", "f64", "--out", str(tmp_path / "b"), "--resolution", "512", "--graphs", "vae_encoder",
             "vae_decoder", "--denoiser", "none"])
    pipe = open_bundle(tmp_path / "b")
    x = sample_photos(1024, 1).numpy()
    z = pipe.encode(x)
    psnr = lambda a, b: 10 * np.log10(4 / np.mean((a - b) ** 2))  # noqa: E731
    assert psnr(pipe.decode(z), pipe.decode(z, tile=512)) >= 40
    assert psnr(pipe.decode(pipe.encode(x, tile=512)), pipe.decode(z)) >= 33  # encoder tiles feed the same decoder


def test_tampered_or_truncated_files_are_refused(bundle, tmp_path):
    from runtimes import BundleError, open_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle / "b", copy)
    f = copy / "vae_decoder" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its checksum"):
        open_bundle(copy).decode(np.zeros((1, 128, 4, 4), np.float32))
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(BundleError, match="truncated"):
        open_bundle(copy).decode(np.zeros((1, 128, 4, 4), np.float32))
    (copy / "vae_encoder" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(copy).encode(np.zeros((256, 256, 3), np.uint8))


def test_newer_manifest_and_missing_pieces(bundle, tmp_path):
    from runtimes import BundleError, RuntimeUnavailable, open_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle / "b", copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["manifest_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer dcae-edge .* pip install -U dcae-edge"):
        open_bundle(copy)
    with pytest.raises(BundleError, match="no onnxruntime int8 artifact"):
        open_bundle(bundle / "b", precision="int8").decode(np.zeros((1, 128, 4, 4), np.float32))
    with pytest.raises(BundleError, match="unknown backend"):
        open_bundle(bundle / "b", backend="tensorrt")
    if sys.platform != "darwin":
        with pytest.raises((RuntimeUnavailable, BundleError)):
            open_bundle(bundle / "b", backend="coreml").decode(np.zeros((1, 128, 4, 4), np.float32))


def test_bad_images_and_latents_name_the_fix(bundle):
    from PIL import Image

    from runtimes import BundleError, open_bundle

    pipe = open_bundle(bundle / "b")
    with pytest.raises(ValueError, match=r"RGBA.*convert\('RGB'\)"):
        pipe.encode(Image.new("RGBA", (256, 256)))
    with pytest.raises(ValueError, match="'L' is not RGB"):
        pipe.encode(Image.new("L", (256, 256)))
    with pytest.raises(ValueError, match="drop the alpha channel"):
        pipe.encode(np.zeros((256, 256, 4), np.uint8))
    with pytest.raises(BundleError, match="not a multiple of the compression factor 64"):
        pipe.encode(np.zeros((250, 256, 3), np.uint8))
    with pytest.raises(BundleError, match="smaller than one 256px tile"):
        pipe.encode(np.zeros((128, 128, 3), np.uint8))  # 2x2 latent would switch an attention branch
    with pytest.raises(BundleError, match=r"latents must be N x 128 x h x w"):
        pipe.decode(np.zeros((1, 32, 4, 4), np.float32))
    with pytest.raises(BundleError, match=r"class id 5 is out of range: this model has classes 0..2"):
        pipe.generate([5], steps=2)
    with pytest.raises(BundleError, match="class-conditional"):
        pipe.generate(None, steps=2)


def test_f32_export_matches_the_h200_reference(tmp_path):
    """The f32 model exported here gives the outputs torch produced on an NVIDIA H200 (fp32, TF32 off)
    within the fp32 tolerance: tests/references/f32-cuda.safetensors, made from the weights beside it
    (the bundled f32 until 12-02; kept so this check outlives retraining the bundled file, which only a
    GPU could re-reference)."""
    from dcae_edge.checkpoints import load_autoencoder, model_fingerprint
    from export import onnx as ex
    from runtimes.parity import run_parity
    from runtimes.reference import load_reference

    ref = ROOT / "tests" / "references" / "f32-cuda.safetensors"
    weights = ROOT / "tests" / "references" / "f32-cuda-weights.safetensors"
    _, meta = load_reference(ref)
    assert meta["autoencoder_fingerprint"] == model_fingerprint(load_autoencoder(weights))
    assert meta["device"] == "cuda" and "H200" in meta["device_name"] and meta["tf32"] is False
    ex.main(["--weights", str(weights), "--out", str(tmp_path / "b"), "--resolution", "256", "--static", "--denoiser", "none"])
    report = run_parity(tmp_path / "b", ref, backends=["onnxruntime"])
    rows = [r for r in report["rows"] if r["status"] != "skipped"]
    assert {r["graph"] for r in rows} == {"vae_encoder", "vae_decoder"} and report["pass"], rows

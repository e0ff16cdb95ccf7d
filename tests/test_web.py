"""The browser app, two tiers: onnxruntime-web + the JavaScript samplers in Node against Python
(noise, every solver, the bundle's graphs, a whole generation), then the page in a real headless
Chromium (Debian's, driven by playwright-core) against the Python pipeline, pixel for pixel."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_model, tiny_denoiser, tiny_edge_f64

from dcae_edge import schedules as S
from dcae_edge.official import DIT_ADM, USIT_ODE, UVIT_DPM

WEB = ROOT / "runtimes" / "web"
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")


def npm_ci() -> None:
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True, capture_output=True)


def toy_model(x, t, variance: bool = False):
    """The stand-in denoiser the Node test implements too (runtimes/web/test/parity.test.mjs)."""
    eps = 0.4 * x * math.cos(t / 350) + 0.2 * math.sin(t / 90) + 0.1 * np.tanh(x)
    return np.concatenate([eps, 0.8 * np.tanh(x * math.sin(t / 200))], 1) if variance else eps


@pytest.fixture(scope="module")
def web_bundle(tmp_path_factory):
    """A tiny f64 bundle at 128 px: encoder, decoder, a class-conditional transformer; fp32 + fp16, and INT8
    for the encoder and decoder."""
    from dcae_edge.checkpoints import latent_fingerprint, save_autoencoder
    from dcae_edge.denoiser import save_denoiser
    from export.onnx import main

    d = tmp_path_factory.mktemp("web")
    ae = make_model(tiny_edge_f64(), seed=4)
    save_autoencoder(ae, d / "ae.safetensors")
    dn = tiny_denoiser(input_size=2, num_classes=3)
    save_denoiser(dn, d / "dn.safetensors", extra={"latent_fingerprint": latent_fingerprint(ae), "class_names": ["a", "b", "c"],
                                                   "recipe": {"steps": 6, "cfg_scale": 2.0}})
    main(["--weights", str(d / "ae.safetensors"), "--denoiser", str(d / "dn.safetensors"), "--out", str(d / "bundle"),
          "--resolution", "128", "--fp16"])
    from calibration.__main__ import run_cli  # INT8 encoder and decoder (on the packaged photos): what auto weighs in the page

    assert run_cli(["--bundle", str(d / "bundle"), "--backend", "onnxruntime", "--graphs", "vae_encoder", "vae_decoder",
                    "--num-samples", "4", "--num-eval", "2", "--cache-dir", str(d / "sets")]) == 0
    return d / "bundle"


def write_fixtures(folder: Path, bundle: Path) -> None:
    from runtimes import open_bundle

    fx = {"bundle": str(bundle), "noise": [], "sampler_cases": [], "graphs": []}
    for seed, count, stream, offset in ((0, 9, 0, 0), (123456789, 16, 0, 3), (7, 10, 1, 4), (2**32 + 5, 5, 0, 0)):
        fx["noise"].append({"seed": seed % 2**32, "count": count, "stream": stream, "offset": offset,
                            "values": S.portable_normals(seed, count, stream, offset).tolist()})
    dims = {"n": 2, "c": 3, "h": 2, "w": 2}
    cases = [("ours flow euler", S.recipe_ours("flow"), 8), ("ours flow heun", S.with_solver(S.recipe_ours("flow"), "heun"), 5),
             ("ours eps dpm++2m", S.recipe_ours("eps"), 12), ("U-ViT DPM-Solver++ 3S", UVIT_DPM, 9),
             ("USiT dopri5", USIT_ODE, None), ("DiT ADM ancestral", DIT_ADM, 25), ("DiT DDIM", S.with_solver(DIT_ADM, "ddim"), 25),
             ("3M heun multistep", {**S.recipe_ours("eps"), "solver": {"name": "dpm_solver++", "method": "multistep", "order": 3,
                                                                      "skip_type": "time_uniform", "t_end": 1e-3, "solver_type": "heun"}}, 20)]
    for name, recipe, steps in cases:
        variance = recipe["solver"]["name"] == "adm"
        noise = S.initial_noise((2, 3, 2, 2), 11)
        out = S.run(recipe, lambda x, t, v=variance: toy_model(x, t, v), noise.astype(np.float32), steps, channels=3,
                    noise_fn=S.step_noise(11))
        fx["sampler_cases"].append({"name": name, "recipe": recipe, "steps": steps, "dims": dims, "seed": 11, "variance": variance,
                                    "noise": noise.ravel().tolist(), "expected": np.asarray(out, np.float64).ravel().tolist()})
    manifest = json.loads((bundle / "manifest.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        pipe = open_bundle(bundle, "onnxruntime", precision)
        for graph in ("vae_encoder", "vae_decoder", "transformer"):
            if f"onnx/{precision}" not in manifest["graphs"][graph]["artifacts"]:
                continue
            spec_inputs = manifest["graphs"][graph]["inputs"]
            if graph == "vae_encoder":
                feeds = {"sample": _photo(128)}
            elif graph == "vae_decoder":
                feeds = {"latent_sample": open_bundle(bundle, precision="fp32").encode(_photo(128))}
            else:
                feeds = {"hidden_states": S.initial_noise((2, 128, 2, 2), 3), "timestep": np.array([999.0, 120.0], np.float32),
                         "class_labels": np.array([1, 3], np.int64)}
            expected = pipe._runner(graph).run(feeds)[0]
            fp32 = open_bundle(bundle, "onnxruntime", "fp32")._runner(graph).run(feeds)[0]
            fx["graphs"].append({"graph": graph, "precision": precision, "expected": expected.ravel().tolist(),
                                 "fp32": fp32.ravel().tolist(),
                                 "feeds": {t["name"]: {"data": feeds[t["name"]].ravel().tolist(), "shape": list(feeds[t["name"]].shape),
                                                       "dtype": t["dtype"]} for t in spec_inputs}})
    _, z = open_bundle(bundle, precision="fp32").generate([0, 2], seed=5, return_latents=True)
    rec = S.recipe_of_manifest(manifest)
    fx["generation"] = {"labels": [0, 2], "steps": rec["steps"], "cfg_scale": rec["cfg_scale"], "seed": 5, "latents": z.ravel().tolist()}
    (folder / "fixtures.json").write_text(json.dumps(fx))


def _photo(size: int) -> np.ndarray:
    from dcae_edge.data import sample_photos

    return sample_photos(size, 1).numpy()


def test_node_tier_matches_python(web_bundle, tmp_path):
    npm_ci()
    write_fixtures(tmp_path, web_bundle)
    res = subprocess.run([NODE, "--test", str(WEB / "test" / "parity.test.mjs"), str(WEB / "test" / "precision.test.mjs")],
                         cwd=WEB, capture_output=True, text=True, env={**os.environ, "DCAE_WEB_FIXTURES": str(tmp_path)}, timeout=600)
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert res.returncode == 0, res.stdout[-4000:]
    assert "# pass 11" in res.stdout and "# fail 0" in res.stdout


def test_browser_auto_follows_the_python_rule():
    """lib/precision.js restates runtimes/precision.py's tie margin and accuracy order: they must agree."""
    from runtimes.precision import ACCURACY_ORDER, AUTO_TIE

    js = (WEB / "lib" / "precision.js").read_text()
    tie = re.search(r"export const AUTO_TIE = ([0-9.]+);", js)
    order = re.search(r"export const ACCURACY_ORDER = (\[[^\]]*\]);", js)
    assert tie and float(tie.group(1)) == AUTO_TIE
    assert order and json.loads(order.group(1)) == [p for p in ACCURACY_ORDER if p in ("fp32", "fp16", "int8")]


# ---------------------------------------------------------------------------------------------- browser tier
def browser(script: str, url: str, out: Path, timeout: int = 600) -> dict:
    """Run a playwright-core script against the page in Debian's Chromium; it prints one JSON line."""
    res = subprocess.run([NODE, str(WEB / "test" / script), url, str(out)], cwd=WEB, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "CHROMIUM": CHROMIUM or ""})
    print(res.stdout[-3000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def page_run(script: str, bundle: Path, folder: Path) -> tuple[dict, np.ndarray]:
    """Serve ``bundle``, save a 128² photo as ``folder``/photo.png, run a page script on it: (its JSON, the photo)."""
    from PIL import Image

    from runtimes.web.__main__ import serve_in_thread

    npm_ci()
    photo = (np.clip(np.round((_photo(128)[0] + 1) * 127.5), 0, 255).astype(np.uint8)).transpose(1, 2, 0)
    Image.fromarray(photo).save(folder / "photo.png")
    server, url = serve_in_thread(bundle)
    try:
        return browser(script, url, folder), photo
    finally:
        server.shutdown()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_in_headless_chromium_matches_python(web_bundle, tmp_path):
    from runtimes import open_bundle

    r, photo = page_run("page.mjs", web_bundle, tmp_path)
    assert r["isolated"] is True and r["threads"] >= 2, r
    assert r["backend"] == "wasm" and r["backendSaid"] == ["backend auto: WASM (this browser offers no WebGPU adapter)"], r
    assert not [m for m in r["messages"] if "error" in m.lower()], r["messages"]
    pipe = open_bundle(web_bundle, precision="fp32")
    # reconstruct: the same 128² PNG through the page and through Python onnxruntime
    ref = (np.clip(np.round((pipe.reconstruct(photo[None]) + 1) * 127.5), 0, 255)).astype(np.uint8)[0].transpose(1, 2, 0)
    page = np.asarray(r["reconstruct"]["pixels"], np.uint8).reshape(128, 128, 4)[..., :3]
    assert psnr_uint8(ref, page) >= 40, psnr_uint8(ref, page)
    assert r["reconstruct"]["latentShape"] == [128, 2, 2]
    # generate: same seed -> same portable noise -> same image
    images = pipe.generate([0, 2], seed=3)
    for i in range(2):
        ref = np.clip(np.round((images[i] + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        page = np.asarray(r["generate"]["images"][i], np.uint8).reshape(128, 128, 4)[..., :3]
        assert psnr_uint8(ref, page) >= 40, psnr_uint8(ref, page)
    assert (tmp_path / "screenshot.png").stat().st_size > 10_000
    assert r["bad_image_message"] and r["page_still_works"]
    # precision auto (the page's default): encoder and decoder timed at fp32 and int8 on first use, the choice said and
    # remembered across a reload; its pixels are those of Python onnxruntime at the same precisions
    assert r["defaultPrecision"] == "auto"
    first, again = r["autoFirst"], r["autoAgain"]
    for graph in ("vae_encoder", "vae_decoder"):
        said = [msg for msg in first["messages"] if msg.startswith(f"precision auto: {graph} →")]
        assert len(said) == 1 and "timed in this browser" in said[0] and "fp16 not timed on wasm" in said[0], first["messages"]
        assert any(msg.startswith(f"precision auto: {graph} →") and "remembered from an earlier visit" in msg
                   for msg in again["messages"]), again["messages"]
    assert first["chosen"] == again["chosen"] and set(first["chosen"].values()) <= {"fp32", "int8"}, first["chosen"]
    original = np.asarray(first["originalPixels"], np.uint8).reshape(128, 128, 4)[..., :3]
    ref = open_bundle(web_bundle, precision=first["chosen"]).reconstruct(original[None])
    ref = np.clip(np.round((ref + 1) * 127.5), 0, 255).astype(np.uint8)[0].transpose(1, 2, 0)
    page = np.asarray(first["pixels"], np.uint8).reshape(128, 128, 4)[..., :3]
    assert psnr_uint8(ref, page) >= 35, (first["chosen"], psnr_uint8(ref, page))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_on_webgpu_matches_python(web_bundle, tmp_path):
    """WebGPU on SwiftShader (Chromium's Vulkan on the CPU): the WebGPU execution provider's shaders give Python's
    pixels at fp32; fp16 on an adapter without shader-f16 is refused in words and left out of auto."""
    from runtimes import open_bundle

    r, photo = page_run("webgpu.mjs", web_bundle, tmp_path)
    if r["adapter"] is None:
        pytest.skip("this Chromium offers no WebGPU adapter, not even SwiftShader's")
    # the page's default backend (auto) does not take a software adapter: SwiftShader is slower than WASM
    assert r["autoBackend"] == "wasm" and len(r["autoSaid"]) == 1 and "is a software fallback" in r["autoSaid"][0], r["autoSaid"]
    assert r["backend"] == "webgpu" and r["label"].startswith("WEBGPU ·"), r["label"]
    pipe = open_bundle(web_bundle, precision="fp32")
    ref = (np.clip(np.round((pipe.reconstruct(photo[None]) + 1) * 127.5), 0, 255)).astype(np.uint8)[0].transpose(1, 2, 0)
    page = np.asarray(r["reconstruct"], np.uint8).reshape(128, 128, 4)[..., :3]
    assert psnr_uint8(ref, page) >= 40, psnr_uint8(ref, page)
    for i, image in enumerate(pipe.generate([0, 2], seed=3)):
        ref = np.clip(np.round((image + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        page = np.asarray(r["generate"][i], np.uint8).reshape(128, 128, 4)[..., :3]
        assert psnr_uint8(ref, page) >= 40, psnr_uint8(ref, page)
    if r["adapter"]["shaderF16"]:  # a real GPU behind this Chromium: fp16 runs and auto may pick it
        assert r["fp16"] == "ran" and set(r["chosen"].values()) <= {"fp32", "fp16"}, r
    else:
        assert "has no shader-f16" in r["fp16"] and "choose fp32 or auto" in r["fp16"], r["fp16"]
        assert r["chosen"] == {"vae_encoder": "fp32", "vae_decoder": "fp32"}, r["chosen"]
        for graph in ("vae_encoder", "vae_decoder"):
            said = [m for m in r["messages"] if m.startswith(f"precision auto: {graph} →")]
            assert len(said) == 1 and "fp16 not timed on webgpu (this WebGPU adapter has no shader-f16" in said[0] \
                and "int8 not timed on webgpu (no QuantizeLinear kernel" in said[0], said
        assert not [m for m in r["messages"] if "cannot run here" in m], r["messages"]  # never tried, so no error
    assert r["lost"].startswith("the WebGPU device was lost (destroyed") and "reload the page" in r["lost"], r["lost"]
    # backend auto on a hardware adapter (SwiftShader made to report itself as one): it takes WebGPU, and Python's pixels
    hw = r["hardware"]
    assert hw["before"] == hw["after"] == "webgpu" and "error" not in hw, hw.get("error")
    assert [m for m in hw["messages"] if m.startswith("backend auto")] == [f"backend auto: WebGPU on {r['adapter']['name']}"]
    page = np.asarray(hw["reconstruct"], np.uint8).reshape(128, 128, 4)[..., :3]
    ref = (np.clip(np.round((pipe.reconstruct(photo[None]) + 1) * 127.5), 0, 255)).astype(np.uint8)[0].transpose(1, 2, 0)
    assert psnr_uint8(ref, page) >= 40, psnr_uint8(ref, page)
    # its GPU device lost (destroyed, as a driver reset or the OS does): the next action runs on WASM, saying why, and
    # WebGPU asked for by name is refused until a reload (onnxruntime-web cannot replace its device)
    lost = hw["afterLoss"]
    assert "error" not in lost and lost["backend"] == "wasm" and lost["asked"] == "wasm", lost.get("error")
    assert any(m.startswith(f"backend auto: the WebGPU device on {r['adapter']['name']} was lost (destroyed")
               and m.endswith("running on WASM from now on") for m in lost["messages"]), lost["messages"]
    assert any(m.startswith("WebGPU was asked for but its device was lost in this page") for m in lost["messages"])
    ref = open_bundle(web_bundle, precision=lost["chosen"]).reconstruct(photo[None])
    ref = np.clip(np.round((ref + 1) * 127.5), 0, 255).astype(np.uint8)[0].transpose(1, 2, 0)
    page = np.asarray(lost["pixels"], np.uint8).reshape(128, 128, 4)[..., :3]
    assert psnr_uint8(ref, page) >= 35, (lost["chosen"], psnr_uint8(ref, page))
    # ... and when WebGPU cannot load a graph there (the adapter refuses a device), auto says so and runs on WASM
    refused = r["refused"]
    assert refused["before"] == "webgpu" and refused["after"] == "wasm" and "error" not in refused, refused.get("error")
    said = [m for m in refused["messages"] if "could not load" in m]
    assert len(said) == 1 and said[0].startswith(f"backend auto: WebGPU on {r['adapter']['name']} could not load vae_encoder") \
        and said[0].endswith("running on WASM from now on"), refused["messages"]
    assert refused["label"].startswith("WASM ·"), refused["label"]
    ref = open_bundle(web_bundle, precision=refused["chosen"]).reconstruct(photo[None])
    ref = np.clip(np.round((ref + 1) * 127.5), 0, 255).astype(np.uint8)[0].transpose(1, 2, 0)
    page = np.asarray(refused["reconstruct"], np.uint8).reshape(128, 128, 4)[..., :3]
    assert psnr_uint8(ref, page) >= 35, (refused["chosen"], psnr_uint8(ref, page))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_shows_bundle_problems_and_keeps_working(web_bundle, tmp_path):
    """A bundle without a transformer (generate disabled, with the reason) and a corrupt file
    (checksum mismatch, shown on the page)."""
    from runtimes.web.__main__ import serve_in_thread

    npm_ci()
    partial = tmp_path / "partial"
    shutil.copytree(web_bundle, partial)
    m = json.loads((partial / "manifest.json").read_text())
    del m["graphs"]["transformer"]
    m["denoiser"] = None
    m.pop("sampler", None)
    enc = m["graphs"]["vae_encoder"]["artifacts"]["onnx/fp32"]["files"][0]
    (partial / "manifest.json").write_text(json.dumps(m))
    data = bytearray((partial / enc).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (partial / enc).unlink()
    (partial / enc).write_bytes(bytes(data))
    server, url = serve_in_thread(partial)
    try:
        r = browser("problems.mjs", url, tmp_path)
    finally:
        server.shutdown()
    assert r["generate_disabled"] and "no denoiser" in r["generate_reason"]
    assert any("checksum" in msg for msg in r["messages"]), r["messages"]
    assert r["backend"] == "wasm" and any("WebGPU was asked for" in msg for msg in r["messages"]), r["messages"]


def test_server_refuses_what_it_must(web_bundle, tmp_path):
    """Files outside the bundle or not in its manifest, and an .onnx over the 2 GB protobuf limit
    (a sparse file here), each a JSON error the page shows."""
    import urllib.error
    import urllib.request

    from runtimes.web.__main__ import serve_in_thread

    b = tmp_path / "b"
    shutil.copytree(web_bundle, b)
    big = b / "vae_decoder" / "huge.onnx"
    with open(big, "wb") as f:
        f.truncate(2 * 1024**3 + 10)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["vae_decoder/huge.onnx"] = {"sha256": "0" * 64, "bytes": big.stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "secret.txt").write_text("x")
    server, url = serve_in_thread(b)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(url + path) as res:
                    return res.status, res.headers, res.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()

        status, headers, _ = get("bundle/manifest.json")
        assert status == 200 and headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        status, _, body = get("bundle/vae_decoder/huge.onnx")
        assert status == 413 and "2 GB protobuf limit" in json.loads(body)["error"]
        for path in ("bundle/../secret.txt", "bundle/%2e%2e/secret.txt", "bundle/vae_decoder/notlisted.onnx"):
            status, _, body = get(path)
            assert status in (403, 404) and "error" in json.loads(body), path
        if (WEB / "node_modules").is_dir():
            status, headers, _ = get("vendor/ort/ort-wasm-simd-threaded.wasm")
            assert status == 200 and headers["Content-Type"] == "application/wasm"
    finally:
        server.shutdown()


def test_manifest_is_strict_json_even_with_an_infinite_psnr(tmp_path):
    """JSON has no Infinity: the browser's JSON.parse rejected a bundle whose Core ML check recorded an
    exact comparison (PSNR inf). write_manifest stores non-finite floats as strings Python reads back."""
    from export.bundle import write_manifest

    write_manifest({"files": {}, "check": {"psnr": float("inf"), "drop": float("-inf"), "x": [float("nan"), 1.5]}}, tmp_path)

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    m = json.loads((tmp_path / "manifest.json").read_text(), parse_constant=reject)
    assert m["check"] == {"psnr": "inf", "drop": "-inf", "x": ["nan", 1.5]} and float(m["check"]["psnr"]) == float("inf")

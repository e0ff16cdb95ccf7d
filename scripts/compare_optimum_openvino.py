"""Our OpenVINO IRs next to optimum-intel's on the same autoencoder (issue 14, item 5b; a probe, not a test).

Writes the bundle's model in diffusers layout, exports it with optimum-intel's ``dcae-encoder`` /
``dcae-decoder`` configs (what its Sana pipeline export uses), and compares both decoders under OpenVINO f32
and bf16 on torch latents of real photos (PSNR vs torch, min / mean, interleaved medians), the encoders by
latency and PSNR against their own f32 output, and how many ops the CPU plugin fused into its RMS kernel.

optimum-intel is not a dependency: install it beside the project without touching torch, e.g.

    python3 -m venv /tmp/optimum && echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/optimum/lib/python3.11/site-packages/project.pth
    /tmp/optimum/bin/pip install -c <(printf 'torch==2.13.0\\nopenvino==2026.4.1\\n') "optimum-intel[openvino]==2.2.0" "huggingface-hub>=1.32,<2"
    /tmp/optimum/bin/pip uninstall -y torchvision   # built for another torch
    PYTHONPATH=. /tmp/optimum/bin/python scripts/compare_optimum_openvino.py --bundle exports/f64
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def optimum_irs(ae, out: Path) -> dict[str, Path]:
    import torch
    from diffusers import AutoencoderDC
    from optimum.exporters.openvino.convert import export_models
    from optimum.exporters.tasks import TasksManager

    from dcae_edge.checkpoints import save_diffusers

    save_diffusers(ae, out / "diffusers")
    vae = AutoencoderDC.from_pretrained(out / "diffusers").eval()
    models = {}
    for graph, model_type in (("vae_encoder", "dcae-encoder"), ("vae_decoder", "dcae-decoder")):
        m = copy.deepcopy(vae)  # optimum's get_sana_models_for_export, as written there
        m.forward = (lambda sample, m=m: {"latent": m.encode(x=sample)["latent"]}) if graph == "vae_encoder" else \
            (lambda latent_sample, m=m: m.decode(z=latent_sample))
        config = TasksManager.get_exporter_config_constructor(model=m, exporter="openvino", library_name="diffusers",
                                                              task="semantic-segmentation", model_type=model_type)
        config = config(vae.config, int_dtype="int64", float_dtype="fp32")
        config.runtime_options = {"ACTIVATIONS_SCALE_FACTOR": "8.0"}
        models[graph] = (m, config)
    with torch.no_grad():
        export_models(models, out / "ir", output_names=[f"{g}/openvino_model.xml" for g in models], library_name="diffusers",
                      stateful=False)
    return {g: out / "ir" / g / "openvino_model.xml" for g in models}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("exports/f64"))
    ap.add_argument("--weights", default="f64", help="the bundle's autoencoder (a variant name or checkpoint) for torch and optimum")
    ap.add_argument("--photos", type=Path, nargs="+", default=[Path("data/photos/eval/scikit-image"), Path("data/photos/eval/opencv-doc")])
    ap.add_argument("--per-folder", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dcae-optimum"))
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    try:  # before the photos and torch references: a missing optimum-intel says so at once
        import optimum.exporters.openvino  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"optimum-intel is not importable here ({e}); install it beside the project as this script's "
                         "docstring says (python scripts/compare_optimum_openvino.py --help)") from None
    import openvino as ov
    import torch

    from dcae_edge.checkpoints import load_autoencoder
    from runtimes.images import load_image

    ae = load_autoencoder(args.weights).eval()
    files = [f for d in args.photos for f in sorted(d.glob("*.jpg"))[:args.per_folder]]
    if not files:
        raise SystemExit(f"no photos in {[str(d) for d in args.photos]}: run python -m dcae_edge.photos --out data/photos")
    x = np.stack([load_image(f, size=512).transpose(2, 0, 1) for f in files]).astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        z = np.concatenate([ae.encode(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
        ref = np.concatenate([ae.decode(torch.from_numpy(z[i:i + 1])).numpy() for i in range(len(z))])
    theirs = optimum_irs(ae, args.work)
    core = ov.Core()
    psnr = lambda a, b, peak=2.0: 10 * np.log10(peak ** 2 / max(float(np.mean((a.astype(np.float64) - b) ** 2)), 1e-30))  # noqa: E731

    for graph, feeds in (("vae_decoder", z), ("vae_encoder", x)):
        irs = {"dcae-edge": args.bundle / graph / "openvino_model.xml", "optimum-intel": theirs[graph]}
        requests, fused = {}, {}
        for who, xml in irs.items():
            for hint in ("f32", "bf16"):
                compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 2,
                                                                "PERFORMANCE_HINT": "LATENCY"})
                requests[who, hint] = compiled.create_infer_request()
                fused[who] = sum(op.get_rt_info()["layerType"].astype(str) == "RMS" for op in compiled.get_runtime_model().get_ops())
        outputs = {k: np.concatenate([r.infer([feeds[i:i + 1]])[0].copy() for i in range(len(feeds))]) for k, r in requests.items()}
        times = {k: [] for k in requests}
        for _ in range(args.runs):  # interleaved: a slow spell on a shared machine hits every IR alike
            for k, r in requests.items():
                t = time.perf_counter()
                r.infer([feeds[:1]])
                times[k].append(1000 * (time.perf_counter() - t))
        print(f"\n{graph} ({len(feeds)} photos at 512²; {'PSNR vs torch' if graph == 'vae_decoder' else 'PSNR vs its own f32 output'})")
        for (who, hint), out in outputs.items():
            if graph == "vae_decoder":
                p = [psnr(out[i], ref[i]) for i in range(len(out))]
            else:
                f32 = outputs[who, "f32"]
                p = [psnr(out[i], f32[i], float(f32[i].max() - f32[i].min())) for i in range(len(out))]
            print(f"  {who:14s} {hint:5s} min {min(p):6.2f} / mean {np.mean(p):6.2f} dB   {statistics.median(times[who, hint]):6.1f} ms"
                  f"   RMS ops fused: {fused[who]}")


if __name__ == "__main__":
    main()

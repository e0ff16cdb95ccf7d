"""Reference outputs of the torch models on fixed real inputs, for the parity suite.

    python -m runtimes.reference --bundle exports/f64 --device cuda --out tests/references/f64-cuda.safetensors
    python -m runtimes.reference --autoencoder f64 --denoiser dcae_edge/weights/digits-f64.safetensors \
        --resolution 256 --device cpu --out ref.safetensors

Stores, in one safetensors file (readable with numpy alone), the inputs and outputs of every
graph under the graph specs' tensor names (``vae_encoder.sample`` -> ``vae_encoder.latent_sample``,
``vae_decoder.latent_sample`` -> ``vae_decoder.sample``, ``transformer.hidden_states`` /
``timestep`` / ``class_labels`` -> ``transformer.sample``) plus a seeded end-to-end generation;
the metadata records the device name, dtype settings (fp32, TF32 off), versions and the weight
fingerprints so that a reference is never compared against other weights.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

# inputs of the end-to-end generation stored in every reference
GENERATE_DEFAULTS = {"steps": 12, "cfg_scale": 3.0, "seed": 7}


def make_reference(autoencoder: str, denoiser: str | None, resolution: int, device: str, num_photos: int | None = None,
                   trajectory_points: int = 6) -> tuple[dict, dict]:
    import torch

    from dcae_edge.checkpoints import autoencoder_fingerprint, latents_match, load_autoencoder, model_fingerprint
    from dcae_edge.data import sample_photos, to_uint8
    from dcae_edge.denoiser import load_denoiser
    from dcae_edge.sample import generate_latents

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; run on a GPU machine or use --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    ae = load_autoencoder(autoencoder, device=device)
    num_photos = num_photos or (2 if resolution <= 256 else 1)  # keeps reference files small
    photos = sample_photos(resolution, num_photos)  # uint8 pixels / 127.5 - 1: stored exactly as uint8
    t = {}
    with torch.no_grad():
        x = photos.to(device)
        z = ae.encoder(x)
        y = ae.decoder(z)
    t["vae_encoder.sample_uint8"], t["vae_encoder.latent_sample"] = to_uint8(photos), z.cpu()
    t["vae_decoder.latent_sample"], t["vae_decoder.sample"] = z.cpu(), y.cpu()
    meta = {"autoencoder_source": autoencoder, "autoencoder_fingerprint": autoencoder_fingerprint(ae),
            "autoencoder": ae.config.name, "scaling_factor": ae.scaling_factor, "resolution": resolution}
    if denoiser:
        dn, dmeta = load_denoiser(denoiser)
        dn = dn.to(device)
        if not latents_match(ae, dmeta):
            raise SystemExit(f"error: denoiser {denoiser} was trained for another autoencoder")
        classes = list(range(min(2, dn.config.num_classes))) if dn.config.conditional else None
        cfg = GENERATE_DEFAULTS["cfg_scale"] if dn.config.conditional else 1.0
        record = []
        with torch.no_grad():
            lat = generate_latents(dn, classes, GENERATE_DEFAULTS["steps"], cfg, GENERATE_DEFAULTS["seed"],
                                   n=2, record=record)
            img = ae.decoder(lat / ae.scaling_factor)
            picks = np.linspace(0, len(record) - 1, trajectory_points).round().astype(int)
            hs = torch.cat([record[i][0] for i in picks])
            ts = torch.cat([record[i][1] for i in picks])
            ys = torch.cat([record[i][2] for i in picks]) if dn.config.conditional else torch.zeros(len(hs), dtype=torch.long)
            out = dn(hs.to(device), ts.to(device), ys.to(device) if dn.config.conditional else None)[:, : dn.config.in_channels]
        t["transformer.hidden_states"], t["transformer.timestep"], t["transformer.class_labels"] = hs, ts, ys
        t["transformer.sample"] = out.cpu()
        t["generate.latents"], t["generate.images_uint8"] = lat.cpu(), to_uint8(img.cpu())
        meta.update(denoiser_source=denoiser, denoiser_fingerprint=model_fingerprint(dn), denoiser=dn.config.name,
                    generate={**GENERATE_DEFAULTS, "cfg_scale": cfg, "class_labels": classes, "n": 2,
                              "sampler": "euler" if dn.config.prediction == "flow" else "dpm++2m"})
    meta.update(device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                dtype="float32", tf32=False, torch=torch.__version__, python=platform.python_version())
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in t.items()}, meta


def save_reference(tensors: dict, meta: dict, path: str | Path) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"reference": json.dumps(meta)})
    tmp.replace(path)


def load_reference(path: str | Path) -> tuple[dict, dict]:
    """numpy-only reader (used by the torch-free parity suite)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such reference file (make one: python -m runtimes.reference --bundle BUNDLE)")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("reference", "{}"))
        tensors = load_file(str(path)) if meta else {}
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors reference file ({e})") from None
    if not meta:
        raise ValueError(f"{path} is not a dcae-edge reference file")
    for key in [k for k in tensors if k.endswith("_uint8")]:  # images stored as exact uint8 pixels
        tensors[key[: -len("_uint8")]] = tensors[key].astype(np.float32) / 127.5 - 1.0
    return tensors, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="exported bundle: weights and resolution are read from its manifest")
    ap.add_argument("--autoencoder", help="autoencoder source (with --bundle: when it is not bundled weights)")
    ap.add_argument("--denoiser", help="denoiser .safetensors (with --bundle: when it is not bundled weights)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    ap.add_argument("--out", help="output file (default: BUNDLE/reference-DEVICE.safetensors)")
    args = ap.parse_args(argv)
    if args.bundle:
        from .backends import RuntimeUnavailable, TorchGraph
        from .pipeline import BundleError, read_manifest

        try:
            manifest = read_manifest(args.bundle, verify=False)
            ae_src = args.autoencoder or TorchGraph._bundled(manifest["autoencoder"]["source"], "pass --autoencoder PATH")
            dn_src = args.denoiser or ((manifest.get("denoiser") or {}).get("source") and
                                       TorchGraph._bundled(manifest["denoiser"]["source"], "pass --denoiser PATH"))
        except (BundleError, RuntimeUnavailable) as e:  # no bundle there; weights not on this machine
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        res = manifest["resolution"]
        out = args.out or str(Path(args.bundle) / f"reference-{args.device}.safetensors")
    else:
        if not args.autoencoder:
            ap.error("pass --bundle or --autoencoder")
        ae_src, dn_src, res = args.autoencoder, args.denoiser, args.resolution
        out = args.out or f"reference-{args.device}.safetensors"
    tensors, meta = make_reference(ae_src, dn_src, res, args.device)
    save_reference(tensors, meta, out)
    print(f"wrote {out} ({meta['device_name']}, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()

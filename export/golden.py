"""Golden vectors for app test suites: real inputs and torch fp32 outputs of every graph, and one
whole generation traced step by step, written into the bundle (``golden/``).

    python -m export.golden --bundle exports/f64
    python -m runtimes.parity --bundle exports/f64 --golden          # check any backend against them

Files (safetensors; tensor names are the graphs' input/output names, so an app feeds them as is):
``golden/vae_encoder.safetensors`` (sample -> latent_sample), ``golden/vae_decoder.safetensors``
(latent_sample -> sample), ``golden/transformer.safetensors`` (hidden_states, timestep,
class_labels -> sample; inputs recorded along a real sampling trajectory),
``golden/generation.safetensors`` (initial noise, every model call's inputs and output, the final
latents and image), ``golden/tolerances.json`` and ``golden/README.md`` (how to assert parity in a
Kotlin / Swift / JS suite). Autoencoder graphs use batch 1 and the bundle resolution, so fixed-shape
mobile graphs can run them unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .bundle import BundleError, bundle_transaction, read_manifest, record_artifact, write_manifest

README = """# Golden vectors

Torch fp32 outputs of this bundle's graphs on real inputs, for your app's own test suite
(written by `python -m export.golden`; {made}).

| file | inputs | outputs |
|---|---|---|
{rows}

Tensor names are the graphs' input and output names. `vae_encoder` inputs are real photos in
[-1, 1] (NCHW float32, {res}x{res}); `vae_decoder` inputs are their latents; `transformer` inputs
were recorded along a real sampling trajectory (a CFG pair per call: [conditional, null class]).

`generation.safetensors` is one whole generation ({gen}): `noise` (the initial latents, seed
{seed}), then for every model call `k`: `call{{k}}.hidden_states`, `call{{k}}.timestep`,
`call{{k}}.class_labels` and `call{{k}}.sample` (the raw model output before guidance); finally
`latents` (the sampler's result, scaled) and `image` (decoded, NCHW in [-1, 1]). The sampler recipe
is the bundle manifest's `sampler` entry (also in `tolerances.json`).

How to assert parity in your suite (e.g. Kotlin with ONNX Runtime Mobile, Swift with Core ML):

1. For each graph file: run the graph on the stored inputs; compare every output with the stored
   one using `tolerances.json` for the precision you ship: `max_abs` (+ `rel` x max|reference|)
   for fp32, `min_psnr` (dB, peak = reference range) for fp16/bf16, `min_cosine` for int8.
2. For the generation: run your sampler from `noise` with the recipe. Compare each model call's
   output with `call{{k}}.sample` given `call{{k}}` inputs (isolates the model), then your final
   latents and image with `latents` / `image` (isolates the sampler: errors accumulate, so use
   the `generation` tolerances).

`python -m runtimes.parity --bundle BUNDLE --golden [--backend onnxruntime --precision fp16]` does
exactly this in Python for any backend of this toolkit.
"""

GENERATION_TOLERANCE = {"fp32": {"max_abs": 1e-3, "rel": 1e-4}, "fp16": {"min_psnr": 30.0}, "bf16": {"min_psnr": 25.0},
                        "int8": {"min_psnr": 20.0}}


def make_golden(manifest: dict, weights: str | None = None, denoiser_path: str | None = None,
                device: str = "cpu") -> tuple[dict, dict]:
    """{file name: {tensor name: array}} and the metadata, from the torch models the bundle came from."""
    import torch

    from dcae_edge.sample import generate_latents
    from dcae_edge.schedules import initial_noise

    from .specs import TransformerGraph, transformer_spec, uses_learned_variance, vae_decoder_spec, vae_encoder_spec

    def torch_run(module, feeds, names):
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names])
        return out.float().cpu().numpy()

    res = int(manifest["resolution"])
    graphs = manifest["graphs"]
    files: dict[str, dict[str, np.ndarray]] = {}
    meta = {"resolution": res, "autoencoder_fingerprint": manifest["autoencoder"]["fingerprint"]}
    ae = _weights_of(manifest, "autoencoder", weights)
    if "vae_encoder" in graphs:
        spec = vae_encoder_spec(ae, res)
        feeds = spec.example_inputs({"batch": 1, "height": res, "width": res})
        files["vae_encoder"] = {**feeds, "latent_sample": torch_run(spec.module, feeds, spec.input_names)}
    if "vae_decoder" in graphs:
        spec = vae_decoder_spec(ae, res)
        f = ae.spatial_compression
        feeds = spec.example_inputs({"batch": 1, "height": res // f, "width": res // f})
        files["vae_decoder"] = {**feeds, "sample": torch_run(spec.module, feeds, spec.input_names)}
    if "transformer" in graphs and manifest.get("denoiser"):
        recipe = manifest.get("sampler")
        denoiser = _weights_of(manifest, "denoiser", weights if manifest["denoiser"].get("release") else denoiser_path)
        graph = TransformerGraph(denoiser, uses_learned_variance(denoiser, recipe)).eval()
        names = ["hidden_states", "timestep", "class_labels"]
        feeds = transformer_spec(denoiser, recipe).example_inputs({"batch": 2})
        files["transformer"] = {**feeds, "sample": torch_run(graph, feeds, names)}
        cfg = denoiser.config
        classes = list(range(min(2, cfg.num_classes))) if cfg.conditional else None
        record: list = []
        z = generate_latents(denoiser, classes, seed=0, n=None if classes else 1, record=record, recipe=recipe)
        n = len(classes) if classes else 1
        gen = {"noise": initial_noise((n, cfg.in_channels, cfg.input_size, cfg.input_size), 0), "latents": z.cpu().numpy()}
        for k, (hs, ts, ys) in enumerate(record):
            call = {"hidden_states": hs.numpy(), "timestep": ts.numpy(),
                    "class_labels": (ys if ys is not None else torch.zeros(len(hs), dtype=torch.long)).numpy()}
            call["sample"] = torch_run(graph, call, names)
            gen.update({f"call{k}.{name}": v for name, v in call.items()})
        if "vae_decoder" in graphs:
            with torch.no_grad():
                gen["image"] = ae.decoder(z.to(device) / float(recipe["latent_scaling_factor"])).float().cpu().numpy()
        files["generation"] = gen
        meta.update(denoiser_fingerprint=manifest["denoiser"]["fingerprint"], classes=classes, seed=0, calls=len(record),
                    steps=recipe.get("steps"), cfg_scale=recipe.get("cfg_scale"))
    return files, meta


def _weights_of(manifest: dict, part: str, weights: str | None):
    """The torch model of the bundle's autoencoder or denoiser, checked by fingerprint."""
    from dcae_edge.checkpoints import load_autoencoder, model_fingerprint
    from dcae_edge.denoiser import load_denoiser
    from runtimes.backends import TorchGraph

    info = manifest[part]
    if info.get("release"):
        from dcae_edge.official import load_diffusion_model

        if not weights:
            raise BundleError(f"golden vectors of {info['release']} need its folder: pass --weights PATH")
        m = load_diffusion_model(weights)
        model = m.autoencoder if part == "autoencoder" else m.denoiser
    else:
        src = weights or TorchGraph._bundled(info["source"])
        model = load_autoencoder(src) if part == "autoencoder" else load_denoiser(src)[0]
    if model_fingerprint(model) != info["fingerprint"]:
        raise BundleError(f"the {part} weights found ({info['source']}) are not the ones this bundle was exported from; "
                          "pass --weights")
    return model


def write_golden(bundle: Path, weights: str | None = None, denoiser: str | None = None) -> dict:
    from safetensors.numpy import save_file

    from .bundle import fresh

    manifest = read_manifest(bundle)
    if manifest is None:
        raise BundleError(f"{bundle} has no manifest.json: export the bundle first (python -m export.onnx)")
    files, meta = make_golden(manifest, weights, denoiser)
    with bundle_transaction(bundle) as stage:
        m = read_manifest(stage)
        gdir = stage / "golden"
        gdir.mkdir(exist_ok=True)
        written = []
        for name, tensors in files.items():
            path = fresh(gdir / f"{name}.safetensors")
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                      metadata={"golden": json.dumps(meta)})
            written.append(path)
        tolerances = {g: m["graphs"][g].get("tolerances", {}) for g in files if g in m["graphs"]}
        tolerances["generation"] = GENERATION_TOLERANCE
        fresh(gdir / "tolerances.json").write_text(json.dumps({"tolerances": tolerances, "sampler": m.get("sampler"),
                                                             "meta": meta}, indent=1))
        rows = "\n".join(f"| `golden/{n}.safetensors` | {', '.join(k for k in t if not k.startswith('call'))[:90]} | |"
                         for n, t in files.items())
        gen = (f"{meta['calls']} model calls, classes {meta['classes']}, steps {meta['steps']}, cfg {meta['cfg_scale']}"
               if "generation" in files else "not in this bundle: it has no denoiser")
        fresh(gdir / "README.md").write_text(README.format(made=f"autoencoder {m['autoencoder']['name']}", rows=rows,
                                                           res=meta["resolution"], gen=gen, seed=meta.get("seed", 0)))
        written += [gdir / "tolerances.json", gdir / "README.md"]
        m["golden"] = {"files": [p.relative_to(stage).as_posix() for p in written], **meta}
        for p in written:
            from .bundle import sha256_file

            m["files"][p.relative_to(stage).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        write_manifest(m, stage)
    return {"files": [str(p.relative_to(stage)) for p in written], **meta}


def main(argv=None) -> int:
    from .common import run_cli

    def run(argv):
        ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        ap.add_argument("--bundle", required=True, type=Path)
        ap.add_argument("--weights", default=None, help="the autoencoder checkpoint or released folder the bundle was "
                                                        "exported from (bundled weights are found by name)")
        ap.add_argument("--denoiser", default=None, help="the denoiser checkpoint (bundled ones are found by name)")
        args = ap.parse_args(argv)
        info = write_golden(args.bundle, args.weights, args.denoiser)
        total = sum((args.bundle / f).stat().st_size for f in info["files"]) / 1e6
        print(f"wrote {len(info['files'])} golden files ({total:.1f} MB) into {args.bundle}/golden")

    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

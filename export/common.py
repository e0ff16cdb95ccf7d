"""What every exporter shares: command-line arguments, model loading with its checks, the graph
specs of a bundle, the shapes each graph is validated at, and the validation checklist."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING
import time
from pathlib import Path

import numpy as np

from dcae_edge.cli import at_least, short_warnings
from dcae_edge.compare import compare, describe, passes

from .bundle import BundleError, new_manifest, read_manifest

if TYPE_CHECKING:  # the specs import torch: only the functions that build graphs need them
    from .specs import GraphSpec

LATENT_CHANNELS = {"f32": 32, "f64": 128, "f128": 512}
COMPRESSION = {"f32": 32, "f64": 64, "f128": 128}
DEFAULT_RESOLUTION = {"f32": 512, "f64": 512, "f128": 512}


class ExportError(RuntimeError):
    """Export refused or failed validation; nothing was written."""


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variant", default=None,
                    help="f32 | f64 | f128: the edge preset (and its bundled weights); optional when --weights names the model")
    ap.add_argument("--weights", default=None,
                    help="autoencoder (anything load_autoencoder takes), or a released DC-AE generator folder / hub id "
                         "(mit-han-lab/dc-ae-...-in-512px: autoencoder + denoiser + sampler); default: the bundled edge "
                         "weights; 'random' = random init")
    ap.add_argument("--denoiser", default=None, help="denoiser .safetensors (default: the bundled one when it fits); 'none' to skip")
    ap.add_argument("--out", default=None, help="bundle folder (default exports/<variant>)")
    ap.add_argument("--resolution", type=at_least(1), default=None, help="export resolution in pixels (default 512)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--static", action="store_true", help="fixed shapes: batch 1 (denoiser: 2 for CFG), one resolution")
    g.add_argument("--dynamic", action="store_true", help="dynamic batch, height, width (default)")
    ap.add_argument("--graphs", nargs="+", default=None, help="subset of vae_encoder vae_decoder transformer")


def notice(msg: str) -> None:
    print(f"\n!!! {msg}\n", flush=True)


def portable_source(src) -> str:
    """What the manifest records about where weights came from: names, never this machine's paths
    (a shipped bundle must not leak its maker's directory layout)."""
    p = Path(str(src))
    return p.name if (p.is_file() or p.is_dir() or p.is_absolute() or str(src).startswith(".")) else str(src)


def weights_digest(src) -> str | None:
    from .bundle import sha256_file

    p = Path(str(src))
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        return sha256_file(files[0]) if len(files) == 1 else None
    return None


def detect_release(weights: str | None) -> bool:
    """True when --weights names a released generator (folder with a known model_name, or its hub id)."""
    if not weights:
        return False
    from dcae_edge.checkpoints import looks_like_path
    from dcae_edge.official import RELEASES

    p = Path(weights)
    if p.is_dir() and (p / "config.json").is_file():
        try:
            name = json.loads((p / "config.json").read_text()).get("model_name", "")
        except json.JSONDecodeError:
            return False
        return name in RELEASES or bool(re.search(r"-(uvit|usit|dit|sit)-", name))
    return (not looks_like_path(weights) and re.fullmatch(r"[\w.-]+/[\w.-]+", weights) is not None
            and weights.split("/")[-1] in RELEASES)


def load_models(args) -> tuple:
    """(autoencoder, ae_info, denoiser or None, dn_info) with every consistency check. Sets
    ``args.variant`` from the weights when it was not given."""
    import torch

    from dcae_edge.checkpoints import (CheckpointError, bundled_weights_path, latent_fingerprint, latents_match,
                                       load_autoencoder, model_fingerprint)
    from dcae_edge.presets import VARIANT_ALIASES

    variant = args.variant
    if variant is not None and variant not in LATENT_CHANNELS:
        raise ExportError(f"unknown --variant {variant!r}: choose one of {', '.join(LATENT_CHANNELS)}")
    weights = args.weights
    if detect_release(weights):
        return _load_release(args)
    if variant is None and weights in (None, "random"):
        raise ExportError("--variant is needed to pick the bundled edge model (f32 | f64 | f128), or pass --weights")
    random_weights = False
    if weights in (None, "random"):
        if weights is None and bundled_weights_path(variant) is not None:
            weights = variant
        else:
            random_weights = True
            if weights is None:
                notice(f"no bundled weights for {variant} yet: exporting a RANDOMLY INITIALISED {VARIANT_ALIASES[variant]} "
                       "(its outputs are meaningless; pass --weights to export a trained model)")
            weights = f"random:{VARIANT_ALIASES[variant]}"
    torch.manual_seed(0)
    try:
        ae = load_autoencoder(weights)
    except (CheckpointError, KeyError) as e:
        raise ExportError(str(e)) from None
    if variant is None:
        variant = f"f{ae.spatial_compression}"
        if variant not in LATENT_CHANNELS:
            raise ExportError(f"--weights {weights}: an f{ae.spatial_compression} autoencoder; the exporters handle "
                              f"{', '.join(LATENT_CHANNELS)}")
    if ae.config.latent_channels != LATENT_CHANNELS[variant] or ae.spatial_compression != COMPRESSION[variant]:
        raise ExportError(f"--weights {weights} is an f{ae.spatial_compression}c{ae.config.latent_channels} model "
                          f"({ae.config.name}) but --variant {variant} expects f{COMPRESSION[variant]}c{LATENT_CHANNELS[variant]}")
    args.variant = variant
    ae_info = {"source": portable_source(weights), "name": ae.config.name, "fingerprint": model_fingerprint(ae),
               "latent_fingerprint": latent_fingerprint(ae), "config": ae.config.to_dict(),
               "scaling_factor": ae.scaling_factor, "spatial_compression": ae.spatial_compression,
               "random_weights": random_weights}
    digest = weights_digest(weights)
    if digest:
        ae_info["weights_sha256"] = digest
    if random_weights:
        ae_info["warning"] = "randomly initialised weights: outputs are meaningless"

    dn, dn_info = None, None
    res = args.resolution or DEFAULT_RESOLUTION[variant]
    if args.denoiser != "none" and ("transformer" in (args.graphs or ["transformer"])):
        from dcae_edge.denoiser import load_denoiser
        from dcae_edge.sample import default_recipe

        explicit = args.denoiser is not None
        path = Path(args.denoiser) if explicit else BUNDLED_DENOISERS.get(variant, Path("/nonexistent"))
        if path.is_file():
            try:
                dn, meta = load_denoiser(path)
            except CheckpointError as e:
                raise ExportError(str(e)) from None
            problem = None
            if dn.config.in_channels != ae.config.latent_channels:
                problem = f"it takes {dn.config.in_channels}-channel latents, the autoencoder makes {ae.config.latent_channels}"
            elif dn.config.input_size * ae.spatial_compression != res:
                problem = (f"it works on {dn.config.input_size}x{dn.config.input_size} latents "
                           f"({dn.config.input_size * ae.spatial_compression}px), not {res}px")
            elif not latents_match(ae, meta):
                problem = "it was trained on the latents of another encoder"
            if problem:
                if explicit:
                    raise ExportError(f"--denoiser {path}: {problem}")
                notice(f"bundled denoiser {path.name} not exported: {problem}")
                dn = None
            else:
                recipe = {**default_recipe(dn), **meta.get("recipe", {}),
                          "latent_scaling_factor": float(meta.get("latent_scaling_factor", ae.scaling_factor)),
                          "latent_shape": [dn.config.in_channels, dn.config.input_size, dn.config.input_size]}
                dn_info = {"source": portable_source(path), "weights_sha256": weights_digest(path), "name": dn.config.name,
                           "fingerprint": model_fingerprint(dn), "config": dn.config.to_dict(),
                           "class_names": meta.get("class_names", []),
                           "latent_scaling_factor": recipe["latent_scaling_factor"], "recipe": recipe}
        elif explicit:
            raise ExportError(f"--denoiser {path}: no such file")
    return ae, ae_info, dn, dn_info


BUNDLED_DENOISERS = {"f64": Path(__file__).resolve().parents[1] / "dcae_edge" / "weights" / "digits-f64.safetensors"}


def _load_release(args) -> tuple:
    """A released generator: its autoencoder, denoiser and sampling recipe, all from one folder."""
    from dcae_edge.checkpoints import CheckpointError, latent_fingerprint, model_fingerprint
    from dcae_edge.official import load_diffusion_model

    if args.denoiser not in (None, "none"):
        raise ExportError(f"--weights {args.weights} is a released generator: it brings its own denoiser; drop --denoiser")
    try:
        m = load_diffusion_model(args.weights)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    ae = m.autoencoder
    variant = f"f{ae.spatial_compression}"
    if args.variant is not None and args.variant != variant:
        raise ExportError(f"--weights {args.weights} is an {variant} model ({m.name}) but --variant is {args.variant}")
    args.variant = variant
    digest = weights_digest(args.weights)
    ae_info = {"source": m.name, "name": ae.config.name, "fingerprint": model_fingerprint(ae),
               "latent_fingerprint": latent_fingerprint(ae), "config": ae.config.to_dict(),
               "scaling_factor": ae.scaling_factor, "spatial_compression": ae.spatial_compression,
               "random_weights": False, "release": m.name}
    dn, dn_info = None, None
    if args.denoiser != "none" and "transformer" in (args.graphs or ["transformer"]):
        dn = m.denoiser
        dn_info = {"source": m.name, "release": m.name, "name": dn.config.name, "fingerprint": model_fingerprint(dn),
                   "config": dn.config.to_dict(), "class_names": m.class_names,
                   "latent_scaling_factor": m.scaling_factor, "recipe": m.recipe}
    if digest:
        ae_info["weights_sha256"] = digest
        if dn_info:
            dn_info["weights_sha256"] = digest
    return ae, ae_info, dn, dn_info


def default_out(args, ae_info: dict) -> Path:
    return Path(args.out or f"exports/{ae_info.get('release') or args.variant}")


def resolve_resolution(args, ae) -> int:
    res = args.resolution or DEFAULT_RESOLUTION[args.variant]
    f = ae.spatial_compression
    if res <= 0 or res % f:
        raise ExportError(f"--resolution {res} is not a positive multiple of the compression factor {f} "
                          f"(try {max(f, round(res / f) * f)})")
    return res


def build_specs(ae, dn, res: int, graphs: list[str] | None, recipe: dict | None = None) -> list[GraphSpec]:
    from .specs import transformer_spec, vae_decoder_spec, vae_encoder_spec

    wanted = graphs or ["vae_encoder", "vae_decoder", "transformer"]
    for g in wanted:
        if g not in ("vae_encoder", "vae_decoder", "transformer"):
            raise ExportError(f"unknown graph {g!r}: choose from vae_encoder vae_decoder transformer")
    specs = []
    if "vae_encoder" in wanted:
        specs.append(vae_encoder_spec(ae, res))
    if "vae_decoder" in wanted:
        specs.append(vae_decoder_spec(ae, res))
    if "transformer" in wanted:
        if dn is not None:
            specs.append(transformer_spec(dn, recipe))
        elif graphs and "transformer" in graphs:
            raise ExportError("--graphs transformer asked, but no denoiser is available for this variant (pass --denoiser)")
    return specs


LEAN_ABOVE_MB = 1024  # graphs with more weights export lean: no simplifier, torch weights freed before validation
TWO_GB = 2 * 1024**3  # protobuf's limit: larger graphs must keep their weights in external data


def weight_bytes(spec: GraphSpec) -> int:
    return sum(p.numel() * p.element_size() for p in spec.module.parameters())


def exports_lean(spec: GraphSpec, above_mb: float = LEAN_ABOVE_MB) -> bool:
    """Whether a graph takes the lean path (external data, references first, torch weights freed):
    above ``above_mb``, and always near protobuf's 2 GB limit."""
    return weight_bytes(spec) > min(above_mb * 1e6, TWO_GB * 0.9)


def release_weights(spec: GraphSpec, specs: list[GraphSpec]) -> bool:
    """Free a graph's torch weights once it is exported and its references are cached, unless a later
    graph shares them. A later uncached reference would fail loudly on the meta device, never silently."""
    later = {id(p) for s in specs[specs.index(spec) + 1:] for p in s.module.parameters()}
    if any(id(p) in later for p in spec.module.parameters()):
        return False
    import gc

    spec.module.to("meta")
    gc.collect()
    return True


def release_unused_encoder(ae, specs: list[GraphSpec], res: int, dynamic: bool, trace_sizes=None) -> bool:
    """Decoder-only exports: compute every photo-latent example the decoder spec will need (trace and
    validation sizes), then drop the encoder's weights. At paper size the encoder is about a third
    of the weights, and tracing + validating the decoder is what sets the peak memory."""
    names = {s.name for s in specs}
    if "vae_encoder" in names or "vae_decoder" not in names:
        return False
    dec = next(s for s in specs if s.name == "vae_decoder")
    dec.trace_inputs(trace_sizes or export_sizes(dec, res, dynamic))  # a batch-2 trace repeats the batch-1 photo
    for sizes in validation_sizes(dec, res, dynamic):
        dec.examples(sizes)
    ae.encoder.to("meta")  # frees the storage; a later, uncached example would fail loudly, not silently
    return True


def export_sizes(spec: GraphSpec, res: int, dynamic: bool = False) -> dict[str, int]:
    """Example shapes to trace with. Dynamic graphs trace at batch 2: torch.export specialises
    dimensions that are 1 in the example (its 0/1 specialisation) and would freeze the batch."""
    if spec.name == "transformer":
        return {"batch": 2}
    unit = res // spec.spatial_scale
    return {"batch": 2 if dynamic else 1, "height": unit, "width": unit}


def validation_sizes(spec: GraphSpec, res: int, dynamic: bool) -> list[dict[str, int]]:
    """The export shape, plus (dynamic graphs) an unseen batch and non-square size that keeps every
    attention stage on the branch it was traced with."""
    first = export_sizes(spec, res, dynamic)
    if not dynamic:
        return [first]
    if spec.name == "transformer":
        return [first, {"batch": 4}]
    unit = res // spec.spatial_scale
    step = spec.meta["spatial_compression"] // spec.spatial_scale  # one latent cell
    want = [s["linear"] for s in spec.attention_stages]
    # paper-size graphs (hundreds of millions of weights) check the unseen size at batch 1: each
    # image costs seconds and gigabytes there, and the small models' checks cover dynamic batches
    large = sum(p.numel() for p in spec.module.parameters()) > 2e8
    candidates = [(unit - step, unit + step), (unit + step, unit + 2 * step), (unit + 2 * step, unit + step), (unit + step, unit + step)]
    if large:  # the smallest non-square size on the same branches: as good a check, a fraction of the time
        cells = unit // step + 2
        candidates = sorted(((a * step, b * step) for a in range(1, cells) for b in range(a + 1, min(2 * a, cells) + 1)),
                            key=lambda hw: (hw[0] * hw[1], hw)) + candidates
    for h, w in candidates:
        if h > 0 and w > 0 and spec.branch_pattern(h, w) == want:
            return [{**first, "batch": 1}, {"batch": 1 if large else 3, "height": h, "width": w}]
    notice(f"{spec.name}: no second resolution keeps the attention branches of {res}px; validated at one size only")
    return [first]


def describe_sizes(spec: GraphSpec, sizes: dict) -> str:
    if "height" in sizes:
        s = spec.spatial_scale
        return f"batch {sizes['batch']}, {sizes['height'] * s}x{sizes['width'] * s}px"
    return f"batch {sizes['batch']}"


def torch_reference(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
        out = spec.module(*args)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.float().numpy() for o in outs]


def validate(spec: GraphSpec, run_fn, sizes_list: list[dict], precision: str, label: str) -> dict:
    """Run ``run_fn(feeds) -> outputs`` at every size on realistic inputs; compare with torch fp32."""
    tol = spec.tolerances[precision].to_dict()
    results, ok = [], True
    for sizes in sizes_list:
        feeds = spec.examples(sizes)
        ref = spec.reference(sizes)
        t = time.perf_counter()
        outs = run_fn(feeds)
        ms = (time.perf_counter() - t) * 1000
        for name, r, o in zip(spec.output_names, ref, outs):
            m = compare(r, o)
            good = passes(m, tol)
            ok &= good
            results.append({"sizes": sizes, "output": name, "pass": good, "ms": round(ms, 1),
                            **{k: v for k, v in m.items() if k != "ref_max_abs"}})
            mark = "✓" if good else "✗"
            print(f"    -[{mark}] {label} {describe_sizes(spec, sizes)}: {describe(m)}  (tolerance {tol})", flush=True)
    return {"pass": bool(ok), "precision": precision, "tolerance": tol, "inputs": "real photos / their latents / sampling trajectory",
            "results": results}


def prepare_manifest(stage: Path, variant: str, res: int, dynamic: bool, ae_info: dict, dn_info: dict | None) -> dict:
    """Keep the existing manifest if it describes the same weights and shapes; otherwise start a
    fresh bundle (stale artifacts of other weights are removed)."""
    import shutil

    old = read_manifest(stage)
    old_dn = (old or {}).get("denoiser")
    # a partial export (--graphs without the transformer) loads no denoiser: it keeps the bundle's
    same = (old is not None and old.get("resolution") == res and old.get("dynamic") == dynamic
            and old.get("autoencoder", {}).get("fingerprint") == ae_info["fingerprint"]
            and (dn_info is None or old_dn is None or old_dn.get("fingerprint") == dn_info["fingerprint"]))
    if same and dn_info is None:
        dn_info = old_dn
    if old is not None and not same:
        print("  existing bundle holds other weights or shapes: replacing it entirely")
        for p in stage.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    m = old if same else new_manifest(variant, res, dynamic)
    m["autoencoder"], m["denoiser"] = ae_info, dn_info
    if dn_info is not None and dn_info.get("recipe"):
        m["sampler"] = dn_info["recipe"]  # what an app in any language reads to sample
    return m


def run_cli(main_fn, argv=None) -> int:
    """Exit codes: 0 ok, 1 validation failed, 2 bad input. Nothing half-written either way."""
    short_warnings()
    try:
        main_fn(argv)
        return 0
    except (ExportError, BundleError) as e:
        print(f"\nerror: {e}\nnothing was written.", file=sys.stderr)
        return 2 if not isinstance(e, ValidationFailed) else 1
    except KeyboardInterrupt:
        print("\ninterrupted: the previous bundle (if any) is untouched.", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a vanished folder: the transaction left nothing behind
        print(f"\nerror: could not write ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}).\n"
              "nothing was written; the previous bundle (if any) is untouched.", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = missing_extra(e.name or "")
        if extra is None:
            raise
        print(f"error: this command needs the [{extra}] extra ({e.name} is not installed): "
              f"pip install 'dcae-edge[{extra}]'\nnothing was written.", file=sys.stderr)
        return 2


EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "onnxslim": "export", "tqdm": "export",
          "matplotlib": "export", "openvino": "openvino", "nncf": "openvino", "coremltools": "coreml",
          "executorch": "mobile", "torchao": "mobile", "huggingface_hub": "hub"}


def missing_extra(module: str) -> str | None:
    """The extra of ours that installs ``module`` (None: not one of our optional dependencies)."""
    return EXTRAS.get(module.split(".")[0])


class ValidationFailed(ExportError):
    pass


def summarize(manifest: dict, out: Path) -> None:
    print(f"\nbundle {out}:")
    for g, info in manifest["graphs"].items():
        for key, art in info["artifacts"].items():
            size = sum(m["bytes"] for k, m in manifest["files"].items()  # a Core ML package is a folder
                       if any(k == f or k.startswith(f + "/") for f in art["files"])) / 1e6
            v = art.get("validation", {})
            status = "valid" if v.get("pass") else ("not validated" if not v or "skipped" in v else "FAILED")
            print(f"  {g:12s} {key:14s} {size:8.2f} MB  {status}")
    print(json.dumps({"manifest": str(out / "manifest.json")}))

"""Quality gates of INT8 graphs, measured on held-out data against the same backend's fp32 graph.

Defaults (flags of ``python -m calibration``):

* ``vae_decoder``: INT8 images vs fp32 images >= 32 dB PSNR (images clipped to [-1, 1], as shown;
  peak = the fp32 images' range), decoding the fp32 latents of held-out photos;
* ``vae_encoder``: latent cosine >= 0.99 on every held-out feed (photo batch);
* ``transformer``: output cosine >= 0.99 on every held-out feed (inputs recorded along held-out sampling
  trajectories);
* end to end (encoder and decoder quantized together, or one of them with the other in fp32):
  reconstruction PSNR against the original photos drops by at most 0.3 dB.

Every number comes from ``dcae_edge.compare`` (the metrics export validation uses too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dcae_edge.compare import compare, passes

from .data import FeedSet, Runner, batched


@dataclass
class Gates:
    encoder_min_cosine: float = 0.99
    decoder_min_psnr: float = 32.0
    transformer_min_cosine: float = 0.99
    max_e2e_drop: float = 0.3

    def tolerance(self, graph: str) -> dict:
        """The gate as a ``dcae_edge.compare.passes`` tolerance."""
        return {"vae_encoder": {"min_cosine": self.encoder_min_cosine},
                "vae_decoder": {"min_psnr": self.decoder_min_psnr},
                "transformer": {"min_cosine": self.transformer_min_cosine}}[graph]


def run_set(run: Runner, fs: FeedSet) -> np.ndarray:
    """The graph's (first) output over a whole set, concatenated along the batch."""
    from tqdm import tqdm

    feeds = tqdm(fs.feeds, desc=f"  running {fs.graph} ({fs.kind})", leave=False, disable=None)
    return np.concatenate([np.asarray(run(f)[0], dtype=np.float32) for f in feeds])


def shown(graph: str, out: np.ndarray) -> np.ndarray:
    """What users see: decoded images are clipped to [-1, 1]; other outputs are compared raw."""
    return np.clip(out, -1, 1) if graph == "vae_decoder" else out


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio (dB) = -20 log10(relative L2 error)."""
    rel = compare(ref, out).get("rel_l2", float("inf"))
    return float("inf") if rel == 0 else -20 * math.log10(rel)


def graph_gate(graph: str, gates: Gates, reference: np.ndarray, run: Runner, fs: FeedSet) -> dict:
    """INT8 outputs vs the fp32 reference outputs on the held-out set."""
    out = run_set(run, fs)
    m = compare(shown(graph, reference), shown(graph, out))
    tol = gates.tolerance(graph)
    metric, threshold = next(iter(tol.items()))
    if metric == "min_cosine":  # the worst held-out feed: a cosine over the whole set let a denoiser through at 0.9925
        m["cosine_whole_set"] = m["cosine"]  # whose output at one reference step had 0.9876
        m["cosine"] = min(compare(reference[a:b], out[a:b])["cosine"] for a, b in feed_spans(fs))
    value = m.get(metric.removeprefix("min_"))
    return {"pass": passes(m, tol), "metric": metric.removeprefix("min_"), "value": value, "threshold": threshold,
            "held_out": fs.source, "samples": len(fs.feeds),
            **{k: m[k] for k in ("psnr", "cosine", "cosine_whole_set", "rel_l2", "max_abs", "nonfinite") if k in m}}


def worst_feed_sqnr(graph: str, reference: np.ndarray, run: Runner, fs: FeedSet) -> float:
    """The lowest output SQNR (dB) vs the fp32 reference over the set's feeds (images clipped as shown);
    -inf if any output is not finite, so a graph that produces NaN ranks last."""
    out = run_set(run, fs)
    if not np.isfinite(out).all():
        return float("-inf")
    ref, out = shown(graph, reference), shown(graph, out)
    return min(sqnr_db(ref[a:b], out[a:b]) for a, b in feed_spans(fs))


def feed_spans(fs: FeedSet) -> list[tuple[int, int]]:
    """[start, stop) of each feed's rows in run_set's concatenated output."""
    spans, start = [], 0
    for f in fs.feeds:
        n = len(next(iter(f.values())))
        spans.append((start, start + n))
        start += n
    return spans


def describe_gate(graph: str, g: dict) -> str:
    unit = " dB" if g["metric"] == "psnr" else ""
    fmt = ".2f" if g["metric"] == "psnr" else ".5f"
    sign = ">=" if g["pass"] else "<"
    return f"{graph}: {g['metric']} {g['value']:{fmt}}{unit} {sign} {g['threshold']}{unit}"


def reconstruct(encode: Runner, decode: Runner, fs: FeedSet, decoder_batch: int) -> np.ndarray:
    latents = run_set(encode, fs)
    return np.clip(np.concatenate([decode(f)[0] for f in batched("latent_sample", latents, decoder_batch)]), -1, 1)


def e2e_gate(gates: Gates, photos_set: FeedSet, fp32: tuple[Runner, Runner], int8: tuple[Runner, Runner],
             decoder_batch: int) -> tuple[dict, dict]:
    """Reconstruction PSNR vs the original photos, fp32 pipeline and INT8 pipeline; (gate, images)."""
    photos = photos_set.photos
    rec32 = reconstruct(*fp32, photos_set, decoder_batch)
    rec8 = reconstruct(*int8, photos_set, decoder_batch)
    p32, p8 = compare(photos, rec32)["psnr"], compare(photos, rec8)["psnr"]
    drop = p32 - p8
    gate = {"pass": bool(np.isfinite(rec8).all() and drop <= gates.max_e2e_drop), "metric": "psnr_drop", "value": drop,
            "threshold": gates.max_e2e_drop, "psnr_fp32": p32, "psnr_int8": p8, "held_out": photos_set.source,
            "samples": len(photos)}
    return gate, {"photos": photos, "fp32": rec32, "int8": rec8}


def describe_e2e(g: dict) -> str:
    return (f"end to end: reconstruction PSNR {g['psnr_fp32']:.2f} dB (fp32) -> {g['psnr_int8']:.2f} dB (INT8), "
            f"drop {g['value']:.3f} dB {'<=' if g['pass'] else '>'} {g['threshold']} dB")

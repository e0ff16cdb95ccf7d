"""Numerical comparison of a backend's output with a reference (numpy only, no torch): used by
export-time validation, the parity suite and the INT8 quality gates."""
from __future__ import annotations

import numpy as np


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """max/mean abs error, relative L2, cosine, PSNR (peak = reference range), NaN/Inf count."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        return {"shape_ref": list(ref.shape), "shape_out": list(out.shape), "nonfinite": 0, "shape_mismatch": True}
    nonfinite = int((~np.isfinite(out)).sum())
    diff = np.where(np.isfinite(out), out - ref, np.inf)
    err = np.abs(diff)
    finite = np.isfinite(err)
    rmse = float(np.sqrt(np.mean(np.where(finite, err, 0) ** 2))) if finite.any() else float("inf")
    peak = float(ref.max() - ref.min()) or 1.0
    num = float(np.sum(ref * np.where(finite, out, 0)))
    den = float(np.linalg.norm(ref) * np.linalg.norm(np.where(finite, out, 0))) or 1.0
    return {
        "max_abs": float(err.max()) if err.size else 0.0,
        "mean_abs": float(err[finite].mean()) if finite.any() else float("inf"),
        "rel_l2": float(np.linalg.norm(np.where(finite, diff, 0)) / (np.linalg.norm(ref) or 1.0)),
        "cosine": num / den,
        "psnr": float("inf") if rmse == 0 else 20 * np.log10(peak / rmse),
        "ref_max_abs": float(np.abs(ref).max()) if ref.size else 0.0,
        "nonfinite": nonfinite,
    }


def passes(metrics: dict, tol: dict) -> bool:
    """Apply a tolerance (``max_abs`` [+ ``rel`` x max|ref|], ``min_psnr``, ``min_cosine``)."""
    if metrics.get("shape_mismatch") or metrics.get("nonfinite", 0):
        return False
    ok = True
    if tol.get("max_abs") is not None:
        ok &= metrics["max_abs"] <= tol["max_abs"] + tol.get("rel", 0.0) * metrics["ref_max_abs"]
    if tol.get("min_psnr") is not None:
        ok &= metrics["psnr"] >= tol["min_psnr"]
    if tol.get("min_cosine") is not None:
        ok &= metrics["cosine"] >= tol["min_cosine"]
    return bool(ok)


def describe(metrics: dict) -> str:
    if metrics.get("shape_mismatch"):
        return f"shape {metrics['shape_out']} != reference {metrics['shape_ref']}"
    return (f"max abs {metrics['max_abs']:.2e}, rel L2 {metrics['rel_l2']:.2e}, PSNR {metrics['psnr']:.1f} dB, "
            f"cos {metrics['cosine']:.6f}" + (f", {metrics['nonfinite']} non-finite" if metrics["nonfinite"] else ""))

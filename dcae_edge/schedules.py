"""Diffusion samplers written once for every backend, driven by a JSON-able *recipe*.

This module imports only numpy. The samplers use nothing but ``+ - *`` with Python floats on the
state ``x``, so the same code drives torch tensors (``dcae_edge.sample``) and numpy arrays
(``runtimes``: onnxruntime / OpenVINO / Core ML), and the browser's JavaScript port
(``runtimes/web/lib/sampler.js``) follows it line by line. Coefficients are computed in float64.

A recipe (stored in every bundle's ``manifest.json`` under ``sampler``) says everything an app in
any language needs to reproduce sampling:

* ``kind: "vp"`` — discrete variance-preserving diffusion, eps prediction.
  ``betas`` (``scaled_linear``: linspace(sqrt(start), sqrt(end), N)**2; ``linear``), N train steps.
  ``timestep``: how the network's time input is formed:
  ``continuous``: model time = t * N - ``offset`` for DPM-Solver's continuous t in (0, 1] (the
  released U-ViT models: offset 0, i.e. 1-indexed steps; our own eps models: offset 1), or
  ``index``: the original integer step (ADM / DiT: 0-indexed).
  Solvers: ``dpm_solver++`` (``method`` ``singlestep`` (DPM-Solver "fast" orders) or
  ``multistep``, ``order`` 1-3, ``skip_type`` ``time_uniform`` / ``logSNR`` / ``discrete``),
  ``adm`` (ancestral sampling on respaced steps, with ADM's learned-range variance when the model
  outputs it), ``ddim`` (deterministic, eta 0).
* ``kind: "flow"`` — a linear path between data and noise. ``time``: ``noise_level`` (ours:
  x_s = (1 - s) data + s noise, model sees ``timestep_scale`` * s and predicts noise - data) or
  ``data_level`` (SiT / the released USiT models: x_t = t data + (1 - t) noise, raw t, predicts
  data - noise). Solvers: ``euler``, ``heun`` (fixed steps) and ``dopri5`` (adaptive, ``atol``,
  ``rtol``; one step size for the whole batch, as torchdiffeq does).

Classifier-free guidance: ``uncond + s (cond - uncond)`` on the first ``cfg_channels`` output
channels (DiT's learned-variance channels pass through from the conditional half).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


class SamplerError(ValueError):
    """A recipe or sampling option that cannot work; the message says what to use instead."""


# Portable noise: a counter-based generator simple enough to re-implement bit for bit in any
# language (the browser's JavaScript, an app's Kotlin or Swift), so a seed means the same image
# everywhere. u32(k) = lowbias32(lowbias32(k ^ key)) for counter k; two words make one 53-bit
# uniform in (0, 1); Box-Muller turns each pair of uniforms into two normals (cos, sin), in
# float64, rounded to float32. key = lowbias32(seed ^ (0x9E3779B9 * (stream + 1))).
NOISE_GENERATOR = "dcae-lowbias32-boxmuller-v1"


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def portable_normals(seed: int, count: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """``count`` standard normals (float32) from position ``offset`` of (seed, stream)."""
    key = _lowbias32(np.array([(seed & 0xFFFFFFFF) ^ ((0x9E3779B9 * (stream + 1)) & 0xFFFFFFFF)], np.uint64))[0]
    first, skip = offset // 2, offset % 2  # the counter advances in whole pairs
    pairs = (skip + count + 1) // 2
    k = (np.arange(first, first + pairs, dtype=np.uint64) * 4) & 0xFFFFFFFF
    words = [_lowbias32(_lowbias32((k + j) & 0xFFFFFFFF ^ key)).astype(np.float64) for j in range(4)]
    u1 = (np.floor(words[0] / 32) * 67108864 + np.floor(words[1] / 64) + 0.5) / 9007199254740992.0
    u2 = (np.floor(words[2] / 32) * 67108864 + np.floor(words[3] / 64) + 0.5) / 9007199254740992.0
    r, theta = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    out = np.stack([r * np.cos(theta), r * np.sin(theta)], 1).reshape(-1)
    return out[skip: skip + count].astype(np.float32)


def initial_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Starting noise for a seed, identical for every backend and language (portable_normals)."""
    return portable_normals(seed, int(np.prod(shape))).reshape(shape)


def step_noise(seed: int) -> Callable:
    """Fresh noise for ancestral samplers: stream 1 of the same seed, consumed in order."""
    used = [0]

    def draw(shape):
        n = int(np.prod(shape))
        start = used[0] + (used[0] % 2)  # each draw starts on a fresh pair
        used[0] = start + n
        return portable_normals(seed, n, stream=1, offset=start).reshape(shape)

    return draw


# ---------------------------------------------------------------------------------------------- recipes
def recipe_ours(prediction: str, steps: int = 30, cfg_scale: float = 1.0) -> dict:
    """Our own denoisers (dcae_edge.train_denoiser): rectified flow or 0-indexed scaled-linear eps."""
    if prediction == "flow":
        return {"kind": "flow", "time": "noise_level", "timestep_scale": 1000.0, "solver": {"name": "euler"},
                "steps": steps, "cfg_scale": cfg_scale}
    return {"kind": "vp", "betas": {"schedule": "scaled_linear", "start": 0.00085, "end": 0.012, "num_train_timesteps": 1000},
            "prediction": "eps", "timestep": {"type": "continuous", "offset": 1},
            "solver": {"name": "dpm_solver++", "method": "multistep", "order": 2, "skip_type": "discrete",
                       "final": "denoise"},
            "steps": steps, "cfg_scale": cfg_scale}


SOLVERS = {"vp": ("dpm_solver++", "adm", "ddim"), "flow": ("euler", "heun", "dopri5")}


def with_solver(recipe: dict, name: str | None) -> dict:
    """The recipe with another solver of its kind (``None`` keeps the recipe's own)."""
    if name is None:
        return recipe
    name = {"dpm++2m": "dpm_solver++", "dpmpp_2m": "dpm_solver++", "dpm++": "dpm_solver++"}.get(name, name)
    kind = recipe["kind"]
    if name not in SOLVERS[kind]:
        raise SamplerError(f"sampler {name!r} does not apply to this {'flow' if kind == 'flow' else 'eps (VP)'} model; "
                           f"choose one of {', '.join(SOLVERS[kind])}")
    if name == recipe["solver"]["name"]:
        return recipe
    defaults = {"dpm_solver++": {"method": "multistep", "order": 2, "skip_type": "time_uniform", "t_end": 1e-3},
                "adm": {}, "ddim": {}, "euler": {}, "heun": {}, "dopri5": {"atol": 1e-6, "rtol": 1e-3}}
    return {**recipe, "solver": {"name": name, **defaults[name]}}


def validate_recipe(recipe: dict) -> None:
    kind = recipe.get("kind")
    if kind not in SOLVERS:
        raise SamplerError(f"unknown sampler kind {kind!r} (expected 'vp' or 'flow'); the bundle was written by "
                           "a newer dcae-edge or edited by hand")
    name = recipe.get("solver", {}).get("name")
    if name not in SOLVERS[kind]:
        raise SamplerError(f"unknown {kind} solver {name!r}; known: {', '.join(SOLVERS[kind])}")


def check_options(steps: int | None, cfg_scale: float | None) -> None:
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 1):
        raise SamplerError(f"steps must be an integer >= 1, got {steps!r}")
    if cfg_scale is not None and not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 1.0):
        raise SamplerError(f"cfg scale must be a finite number >= 1 (1 = no guidance), got {cfg_scale!r}")


def guided(cond, uncond, scale: float, channels: int | None = None):
    """Classifier-free guidance ``uncond + s (cond - uncond)`` on the first ``channels`` channels;
    the rest (a learned variance) is the conditional half's."""
    if channels is None or channels >= cond.shape[1]:
        return uncond + scale * (cond - uncond)
    eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    rest = cond[:, channels:]
    if isinstance(eps, np.ndarray):
        return np.concatenate([eps, rest], axis=1)
    import torch  # the torch sampler; never reached from the torch-free runtimes

    return torch.cat([eps, rest], dim=1)


# ---------------------------------------------------------------------------------------------- VP schedules
def betas_for(spec: dict) -> np.ndarray:
    n = int(spec.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
    if spec["schedule"] == "scaled_linear":
        return np.linspace(spec["start"] ** 0.5, spec["end"] ** 0.5, n, dtype=np.float64) ** 2
    if spec["schedule"] == "linear":
        return np.linspace(spec["start"], spec["end"], n, dtype=np.float64)
    raise SamplerError(f"unknown beta schedule {spec['schedule']!r} (scaled_linear | linear)")


def ddpm_alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The scaled-linear schedule (U-ViT / SD / our eps models)."""
    return np.cumprod(1.0 - betas_for({"schedule": "scaled_linear", "start": 0.00085, "end": 0.012,
                                       "num_train_timesteps": num_steps}))


class DiscreteVP:
    """DPM-Solver's continuous-time view of a discrete schedule: log alpha piecewise linear in t over
    the knots t_k = k / N (k = 1..N, 1-indexed), extended linearly beyond the end knots."""

    def __init__(self, alphas_cumprod: np.ndarray):
        self.n = len(alphas_cumprod)
        self.t_knots = np.arange(1, self.n + 1, dtype=np.float64) / self.n
        self.log_alpha_knots = 0.5 * np.log(alphas_cumprod)

    @staticmethod
    def _interp(x, xp, yp):
        j = np.clip(np.searchsorted(xp, x, side="left") - 1, 0, len(xp) - 2)
        return yp[j] + (x - xp[j]) * (yp[j + 1] - yp[j]) / (xp[j + 1] - xp[j])

    def log_alpha(self, t):
        return self._interp(np.asarray(t, np.float64), self.t_knots, self.log_alpha_knots)

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return np.exp(la), np.sqrt(-np.expm1(2 * la))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * np.log(-np.expm1(2 * la))

    def inverse_lambda(self, lam):
        la = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
        return self._interp(la, self.log_alpha_knots[::-1].copy(), self.t_knots[::-1].copy())


class Point:
    """One place on the noise schedule: alpha, sigma, lambda and the network's time input there
    (``model_t`` None for the noise-free end point, where the network is never called)."""
    __slots__ = ("alpha", "sigma", "lam", "model_t")

    def __init__(self, alpha: float, sigma: float, model_t: float | None):
        self.alpha, self.sigma, self.model_t = float(alpha), float(sigma), model_t
        self.lam = math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def vp_grid(recipe: dict, steps: int) -> list[Point]:
    """steps + 1 points from pure noise to the end of sampling for DPM-Solver."""
    solver = recipe["solver"]
    acp = np.cumprod(1.0 - betas_for(recipe["betas"]))
    n = len(acp)
    ts = recipe.get("timestep", {"type": "continuous", "offset": 0})
    skip = solver.get("skip_type", "time_uniform")
    if skip == "discrete":  # diffusers' "linspace" spacing on the integer steps; last point: noise-free
        if not 1 <= steps <= n:
            raise SamplerError(f"steps must lie in [1, {n}], got {steps}")
        idx = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        pts = [Point(math.sqrt(acp[i]), math.sqrt(1 - acp[i]), float(i + 1 - ts.get("offset", 0))) for i in idx]
        final = solver.get("final", "denoise")
        pts.append(Point(1.0, 0.0, None) if final == "denoise" else Point(math.sqrt(acp[0]), math.sqrt(1 - acp[0]), None))
        return pts
    vp = DiscreteVP(acp)
    t_end, t_start = float(solver.get("t_end", 1.0 / n)), 1.0
    if skip == "time_uniform":
        t = np.linspace(t_start, t_end, steps + 1)
    elif skip == "logSNR":
        t = vp.inverse_lambda(np.linspace(float(vp.lam(t_start)), float(vp.lam(t_end)), steps + 1))
    elif skip == "time_quadratic":
        t = np.linspace(t_start ** 0.5, t_end ** 0.5, steps + 1) ** 2
    else:
        raise SamplerError(f"unknown skip_type {skip!r} (time_uniform | logSNR | time_quadratic | discrete)")
    alpha, sigma = vp.alpha_sigma(t)
    off = float(ts.get("offset", 0))
    pts = [Point(a, s, float(tt) * n - off) for a, s, tt in zip(alpha, sigma, t)]
    if solver.get("final") == "denoise":  # one more first-order step to sigma = 0 (returns the x0 prediction)
        pts.append(Point(1.0, 0.0, None))
    return pts


def fast_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver "fast": outer steps of the given order that together take ``steps`` model calls."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else ([3] * (k - 1) + [1] if steps % 3 == 1 else [3] * (k - 1) + [2])
    if order == 2:
        return [2] * (steps // 2) if steps % 2 == 0 else [2] * (steps // 2) + [1]
    if order == 1:
        return [1] * steps
    raise SamplerError(f"DPM-Solver order must be 1, 2 or 3, got {order}")


# The DPM-Solver++ updates in data-prediction form (Lu et al. 2022), from point s to t with h =
# lambda_t - lambda_s, phi1 = expm1(-h), phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2. ``m*`` are x0
# predictions; r = (lambda_intermediate - lambda_s) / h.
def _first(x, s: Point, t: Point, m_s):
    if t.sigma == 0:
        return t.alpha * m_s
    h = t.lam - s.lam
    return (t.sigma / s.sigma) * x - (t.alpha * math.expm1(-h)) * m_s


def _second(x, s: Point, t: Point, m_s, m_1, r: float, kind: str):
    if t.sigma == 0:  # no noise left: the higher-order terms vanish with phi1 -> -1
        return _first(x, s, t, m_s)
    h = t.lam - s.lam
    phi1 = math.expm1(-h)
    base = (t.sigma / s.sigma) * x - (t.alpha * phi1) * m_s
    if kind == "midpoint":
        return base - (0.5 / r) * (t.alpha * phi1) * (m_1 - m_s)
    return base + (1.0 / r) * (t.alpha * (phi1 / h + 1.0)) * (m_1 - m_s)  # taylor / heun


def _third(x, s: Point, t: Point, m_s, m_1, m_2, r1: float, r2: float, kind: str):
    if t.sigma == 0:
        return _first(x, s, t, m_s)
    h = t.lam - s.lam
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    base = (t.sigma / s.sigma) * x - (t.alpha * phi1) * m_s
    if kind == "midpoint":
        return base + (1.0 / r2) * (t.alpha * phi2) * (m_2 - m_s)
    d1_0, d1_1 = (1.0 / r1) * (m_1 - m_s), (1.0 / r2) * (m_2 - m_s)
    d1 = (r2 * d1_0 - r1 * d1_1) * (1.0 / (r2 - r1))
    d2 = (2.0 / (r2 - r1)) * (d1_1 - d1_0)
    return base + (t.alpha * phi2) * d1 - (t.alpha * (phi2 / h - 0.5)) * d2


# solver_type -> (second-order intermediate of a third-order step, second-order final, third-order final)
SINGLESTEP_KINDS = {
    "dpm_solver": ("taylor", "midpoint", "midpoint"),   # DPM-Solver / the released U-ViT models
    "midpoint": ("midpoint", "midpoint", "midpoint"),   # diffusers DPMSolverSinglestepScheduler
    "heun": ("taylor", "taylor", "taylor"),             # diffusers solver_type="heun"
}


def dpm_solver_singlestep(x0_fn: Callable, x, pts: list[Point], orders: list[int], solver_type: str = "dpm_solver"):
    """Singlestep DPM-Solver++: outer steps of order k from pts[i] to pts[i+k], whose intermediate
    model calls land on the grid points between them (pts[i+1], pts[i+2]).
    ``x0_fn(x, point) -> x0 prediction``."""
    inter2, final2, final3 = SINGLESTEP_KINDS[solver_type]
    i = 0
    for k in orders:
        s, t = pts[i], pts[i + k]
        m_s = x0_fn(x, s)
        if k == 1:
            x = _first(x, s, t, m_s)
        else:
            p1 = pts[i + 1]
            h = t.lam - s.lam
            r1 = (p1.lam - s.lam) / h if math.isfinite(h) else None
            m_1 = x0_fn(_first(x, s, p1, m_s), p1)
            if k == 2:
                x = _second(x, s, t, m_s, m_1, r1, final2)
            else:
                p2 = pts[i + 2]
                r2 = (p2.lam - s.lam) / h if math.isfinite(h) else None
                x_2 = _second(x, s, p2, m_s, m_1, (p1.lam - s.lam) / (p2.lam - s.lam), inter2)
                m_2 = x0_fn(x_2, p2)
                x = _third(x, s, t, m_s, m_1, m_2, r1, r2, final3)
        i += k
    return x


def dpm_solver_multistep(x0_fn: Callable, x, pts: list[Point], order: int = 2, solver_type: str = "midpoint",
                         lower_order_final: bool = True):
    """Multistep DPM-Solver++ (diffusers DPMSolverMultistepScheduler semantics: lower orders while
    the history fills up, and at the end of short schedules or before a noise-free last point)."""
    steps = len(pts) - 1
    hist: list = []  # (point, x0)
    for i in range(steps):
        s, t = pts[i], pts[i + 1]
        m = x0_fn(x, s)
        hist = (hist + [(s, m)])[-3:]
        last = i == steps - 1
        final_low = last and lower_order_final and (steps < 15 or t.sigma == 0)
        second_low = i == steps - 2 and lower_order_final and steps < 15
        if order == 1 or len(hist) < 2 or final_low:
            x = _first(x, s, t, m)
        elif order == 2 or len(hist) < 3 or second_low:
            (p1, m1), (p0, m0) = hist[-2], hist[-1]
            h, h0 = t.lam - p0.lam, p0.lam - p1.lam
            r0 = h0 / h
            d1 = (1.0 / r0) * (m0 - m1)
            phi1 = math.expm1(-h)
            x = (t.sigma / p0.sigma) * x - (t.alpha * phi1) * m0
            x = x - 0.5 * (t.alpha * phi1) * d1 if solver_type == "midpoint" else x + (t.alpha * (phi1 / h + 1.0)) * d1
        else:
            (p2, m2), (p1, m1), (p0, m0) = hist
            h, h0, h1 = t.lam - p0.lam, p0.lam - p1.lam, p1.lam - p2.lam
            r0, r1 = h0 / h, h1 / h
            d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            phi1 = math.expm1(-h)
            phi2 = phi1 / h + 1.0
            x = (t.sigma / p0.sigma) * x - (t.alpha * phi1) * m0 + (t.alpha * phi2) * d1 - (t.alpha * (phi2 / h - 0.5)) * d2
    return x


# ---------------------------------------------------------------------------------------------- ADM / DDIM
def respaced_steps(num_train: int, steps: int) -> list[int]:
    """ADM ``space_timesteps(N, str(steps))``: evenly strided original steps (round half to even)."""
    if not 1 <= steps <= num_train:
        raise SamplerError(f"steps must lie in [1, {num_train}], got {steps}")
    if steps == 1:
        return [0]
    stride = (num_train - 1) / (steps - 1)
    cur, out = 0.0, []
    for _ in range(steps):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def adm_tables(recipe: dict, steps: int) -> dict:
    acp_full = np.cumprod(1.0 - betas_for(recipe["betas"]))
    use = respaced_steps(len(acp_full), steps)
    acp = acp_full[use]
    acp_prev = np.append(1.0, acp[:-1])
    betas = 1.0 - acp / acp_prev
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {"timesteps": use, "acp": acp, "acp_prev": acp_prev, "betas": betas,
            "coef_x0": betas * np.sqrt(acp_prev) / (1.0 - acp), "coef_xt": (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
            "min_log": np.log(np.append(post_var[1], post_var[1:])) if len(use) > 1 else np.log(np.maximum(post_var, 1e-20)),
            "max_log": np.log(betas)}


def sample_adm(model_fn: Callable, x, recipe: dict, steps: int, noise_fn: Callable, channels: int, exp: Callable):
    """ADM ancestral sampling (``p_sample_loop``, no clipping) with the learned-range variance
    when the model outputs 2C channels, else the fixed posterior variance ("fixed_small")."""
    tab = adm_tables(recipe, steps)
    for i in range(len(tab["timesteps"]) - 1, -1, -1):
        out = model_fn(x, float(tab["timesteps"][i] + recipe.get("timestep", {}).get("offset", 0)))
        eps = out[:, :channels]
        x0 = math.sqrt(1.0 / tab["acp"][i]) * x - math.sqrt(1.0 / tab["acp"][i] - 1.0) * eps
        mean = float(tab["coef_x0"][i]) * x0 + float(tab["coef_xt"][i]) * x
        if i == 0:
            x = mean
            break
        if out.shape[1] >= 2 * channels:
            frac = (out[:, channels:2 * channels] + 1.0) * 0.5
            log_var = frac * float(tab["max_log"][i]) + (1.0 - frac) * float(tab["min_log"][i])
            std = exp(0.5 * log_var)
        else:
            std = math.exp(0.5 * float(tab["min_log"][i])) if i > 0 else 0.0
        x = mean + std * noise_fn(tuple(x.shape))
    return x


def sample_ddim(model_fn: Callable, x, recipe: dict, steps: int, channels: int):
    """Deterministic DDIM (eta 0) on the respaced steps; the last step lands on alpha_bar = 1."""
    tab = adm_tables(recipe, steps)
    for i in range(len(tab["timesteps"]) - 1, -1, -1):
        eps = model_fn(x, float(tab["timesteps"][i] + recipe.get("timestep", {}).get("offset", 0)))[:, :channels]
        a, a_prev = float(tab["acp"][i]), float(tab["acp_prev"][i])
        x0 = (x - math.sqrt(1.0 - a) * eps) * (1.0 / math.sqrt(a))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


# ---------------------------------------------------------------------------------------------- flow
def flow_times(steps: int, shift: float = 1.0) -> np.ndarray:
    """steps + 1 noise levels from 1 to 0; shift > 1 spends more steps at high noise (SD3 / SANA)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def _flow_velocity(recipe: dict, model_fn: Callable, channels: int):
    """v(x, s) = d x / d s in *noise level* s (1 = noise, 0 = data), whatever the model's convention."""
    scale = float(recipe.get("timestep_scale", 1000.0))
    if recipe.get("time", "noise_level") == "noise_level":
        return lambda x, s: model_fn(x, s * scale)[:, :channels]
    return lambda x, s: -1.0 * model_fn(x, (1.0 - s) * scale)[:, :channels]  # SiT: t = 1 - s, u = data - noise


def sample_flow_fixed(velocity: Callable, x, steps: int, method: str, shift: float = 1.0):
    ss = flow_times(steps, shift)
    for i in range(steps):
        s, s_next = float(ss[i]), float(ss[i + 1])
        v = velocity(x, s)
        if method == "heun" and s_next > 0:
            v_next = velocity(x + (s_next - s) * v, s_next)
            x = x + (s_next - s) * 0.5 * (v + v_next)
        else:
            x = x + (s_next - s) * v
    return x


# Dormand-Prince 5(4) tableau (torchdiffeq's dopri5)
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9), (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_ERR = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720, -2187 / 6784 - -12231 / 42400,
           11 / 84 - 649 / 6300, -1 / 60)
_DP_MID = (6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
           187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)


def sample_dopri5(field: Callable, x, atol: float = 1e-6, rtol: float = 1e-3, to_numpy: Callable = np.asarray,
                  max_steps: int = 10000, record: list | None = None):
    """Adaptive Dormand-Prince from t = 0 to t = 1 of dx/dt = field(x, t), as torchdiffeq's
    ``odeint(method="dopri5")`` does it: its initial step, RMS error norm over the whole batch,
    safety 0.9 and factor clamp [0.2, 10]; steps may overshoot t = 1 and the answer is the
    4th-order dense-output interpolant at t = 1."""
    def npy(a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else to_numpy(a)

    def rms(a) -> float:
        v = npy(a).astype(np.float64)
        return float(np.sqrt(np.mean(v * v)))

    f0 = field(x, 0.0)
    scale = atol + rtol * np.abs(npy(x)).astype(np.float64)
    d0, d1 = rms(npy(x) / scale), rms(npy(f0) / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    f1 = field(x + h0 * f0, h0)
    d2 = rms(npy(f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if (d1 <= 1e-15 and d2 <= 1e-15) else (0.01 / max(d1, d2)) ** (1 / 5)
    dt = min(100 * h0, h1)
    t0, t1, y, f, n = 0.0, 0.0, x, f0, 0
    y_prev, f_prev, y_mid, dt_acc = x, f0, x, dt
    while t1 < 1.0:
        if n >= max_steps:
            raise SamplerError(f"dopri5 took more than {max_steps} steps (tolerances too tight for this model?)")
        n += 1
        k = [f]
        for c, row in zip(_DP_C, _DP_A):
            yi = y
            for kj, aij in zip(k, row):
                if aij:
                    yi = yi + (dt * aij) * kj
            k.append(field(yi, t1 + c * dt))
        y_new, f_new = yi, k[-1]  # the last stage's input is the 5th-order solution (FSAL)
        err = None
        for kj, ej in zip(k, _DP_ERR):
            if ej:
                err = (dt * ej) * kj if err is None else err + (dt * ej) * kj
        tol = atol + rtol * np.maximum(np.abs(npy(y)), np.abs(npy(y_new))).astype(np.float64)
        ratio = rms(npy(err).astype(np.float64) / tol)
        if ratio <= 1.0:
            mid = y
            for kj, cj in zip(k, _DP_MID):
                if cj:
                    mid = mid + (dt * cj) * kj
            y_prev, f_prev, y_mid, dt_acc = y, f, mid, dt
            t0, t1, y, f = t1, t1 + dt, y_new, f_new
            if record is not None:
                record.append(t1)
        dt = dt * (10.0 if ratio == 0 else min(10.0, max(0.9 / ratio ** 0.2, 1.0 if ratio < 1 else 0.2)))
    if t1 == 1.0:
        return y
    # 4th-order dense output of the last accepted step, evaluated at t = 1
    s = (1.0 - t0) / (t1 - t0)
    a = (2 * dt_acc) * (f - f_prev) - 8.0 * (y + y_prev) + 16.0 * y_mid
    b = dt_acc * (5.0 * f_prev - 3.0 * f) + 18.0 * y_prev + 14.0 * y - 32.0 * y_mid
    c = dt_acc * (f - 4.0 * f_prev) - 11.0 * y_prev - 5.0 * y + 16.0 * y_mid
    return y_prev + (s * dt_acc) * f_prev + (s * s) * c + (s ** 3) * b + (s ** 4) * a


# ---------------------------------------------------------------------------------------------- entry point
def run(recipe: dict, model_fn: Callable, x, steps: int | None = None, channels: int | None = None,
        noise_fn: Callable | None = None, exp: Callable = np.exp, to_numpy: Callable = np.asarray):
    """Sample from noise ``x`` with ``model_fn(x, timestep: float) -> output`` (CFG already applied).

    ``channels``: the prediction's channels (the rest of the output is a learned variance).
    ``noise_fn(shape)``: fresh noise for ancestral steps; ``exp``/``to_numpy``: the array library's
    (the defaults are numpy's; the torch sampler passes torch.exp and a .numpy() converter).
    Returns the final latents (scaled; divide by the AE's scaling factor to decode)."""
    validate_recipe(recipe)
    steps = int(steps or recipe.get("steps", 30))
    check_options(steps, None)
    channels = channels or x.shape[1]
    solver = recipe["solver"]
    name = solver["name"]
    if recipe["kind"] == "flow":
        velocity = _flow_velocity(recipe, model_fn, channels)
        if name == "dopri5":
            field = lambda y, t: -1.0 * velocity(y, 1.0 - t)  # integrate t = 1 - s from 0 to 1  # noqa: E731
            return sample_dopri5(field, x, float(solver.get("atol", 1e-6)), float(solver.get("rtol", 1e-3)), to_numpy)
        return sample_flow_fixed(velocity, x, steps, name, float(solver.get("shift", 1.0)))
    if name == "adm":
        if noise_fn is None:
            raise SamplerError("ancestral sampling needs a noise source (noise_fn)")
        return sample_adm(model_fn, x, recipe, steps, noise_fn, channels, exp)
    if name == "ddim":
        return sample_ddim(model_fn, x, recipe, steps, channels)
    pts = vp_grid(recipe, steps)

    def x0_fn(y, p: Point):
        eps = model_fn(y, p.model_t)[:, :channels]
        return (y - p.sigma * eps) * (1.0 / p.alpha)

    if solver.get("method", "multistep") == "singlestep":
        orders = fast_orders(len(pts) - 1, int(solver.get("order", 3)))
        return dpm_solver_singlestep(x0_fn, x, pts, orders, solver.get("solver_type", "dpm_solver"))
    return dpm_solver_multistep(x0_fn, x, pts, int(solver.get("order", 2)), solver.get("solver_type", "midpoint"),
                                solver.get("lower_order_final", True))


def recipe_of_manifest(manifest: dict) -> dict:
    """The bundle's sampling recipe (older bundles: derived from the denoiser's prediction type)."""
    if manifest.get("sampler"):
        return manifest["sampler"]
    den = manifest.get("denoiser") or {}
    cfg = den.get("config") or {}
    recipe = with_solver(recipe_ours(cfg.get("prediction", "flow")), den.get("sampler"))
    return {**recipe, "null_class": cfg.get("num_classes", 0), "num_classes": cfg.get("num_classes", 0),
            "cfg_channels": cfg.get("in_channels"), "latent_scaling_factor": den.get("latent_scaling_factor"),
            "latent_shape": [cfg.get("in_channels"), cfg.get("input_size"), cfg.get("input_size")]}


def generate_numpy(recipe: dict, run: Callable, labels, n: int = 1, steps: int | None = None, cfg_scale: float | None = None,
                   seed: int = 0, latents=None, sampler: str | None = None, record: list | None = None,
                   static_batch: int | None = None) -> np.ndarray:
    """Sample latents with a numpy graph runner ``run(feeds) -> output`` (the transformer graph's
    feeds: hidden_states, timestep, class_labels). The exact twin of ``dcae_edge.sample``:
    same noise, same CFG batching ([cond, null]), same solver. ``labels``: int array (None for
    unconditional models); ``latents``: explicit initial noise; ``record``: appends every feed."""
    recipe = with_solver(recipe, sampler)
    steps = steps if steps is not None else int(recipe.get("steps", 30))
    cfg_scale = float(cfg_scale if cfg_scale is not None else recipe.get("cfg_scale", 1.0))
    conditional = labels is not None
    check_options(steps, cfg_scale)
    c, h, w = recipe["latent_shape"]
    null = int(recipe.get("null_class", 0))
    if conditional:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = len(labels)
    elif cfg_scale != 1.0:
        raise SamplerError("classifier-free guidance needs a class-conditional denoiser; use cfg 1")
    use_cfg = conditional and cfg_scale != 1.0
    if static_batch and (2 * n if use_cfg else n) % static_batch:
        raise SamplerError(f"this transformer graph has a fixed batch of {static_batch}: sample "
                           f"{static_batch // 2 if use_cfg else static_batch} image(s) at a time" +
                           (" with guidance (cfg > 1)" if static_batch == 2 and not use_cfg else ""))

    def model_fn(x, t):
        xin = np.concatenate([x, x]) if use_cfg else x
        yin = (np.concatenate([labels, np.full_like(labels, null)]) if use_cfg else labels) if conditional \
            else np.zeros(len(xin), np.int64)
        feed = {"hidden_states": np.ascontiguousarray(xin, dtype=np.float32),
                "timestep": np.full(len(xin), t, dtype=np.float32), "class_labels": yin}
        if record is not None:
            record.append(feed)
        if static_batch and len(xin) != static_batch:
            out = np.concatenate([run({k: v[i:i + static_batch] for k, v in feed.items()})
                                  for i in range(0, len(xin), static_batch)])
        else:
            out = run(feed)
        out = np.asarray(out, dtype=np.float32)
        if not np.isfinite(out).all():
            raise SamplerError(f"the transformer returned NaN/Inf at timestep {t:g}; this artifact is broken for these "
                               "inputs (try fp32, or re-export)")
        return guided(out[:n], out[n:], cfg_scale, recipe.get("cfg_channels") or c) if use_cfg else out

    shape = (n, c, h, w)
    if latents is not None:
        x = np.asarray(latents, dtype=np.float32)
        if x.shape != shape:
            raise SamplerError(f"initial latents must be {shape}, got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise SamplerError("initial latents hold NaN/Inf")
    else:
        x = initial_noise(shape, seed)
    return np.asarray(run_recipe(recipe, model_fn, x, steps, c, step_noise(seed)), dtype=np.float32)


run_recipe = run


def trajectory_timesteps(recipe: dict, steps: int) -> list[float]:
    """The network time inputs a sampler visits (records a dry run with a zero model)."""
    seen: list[float] = []

    def fn(x, t):
        seen.append(float(t))
        return np.zeros_like(x)

    run(recipe, fn, np.zeros((1, 1, 1, 1)), steps, noise_fn=lambda shape: np.zeros(shape, np.float32))
    return seen


def add_sampling_arguments(ap) -> None:
    """The sampling options shared by the torch CLI (``dcae_edge.sample``) and the app CLI
    (``runtimes.generate``): defaults come from the model's recipe."""
    ap.add_argument("--classes", nargs="*", default=None,
                    help="class ids or names (e.g. 207 360 or \"golden retriever\"), for class-conditional denoisers")
    ap.add_argument("--n", type=int, default=4, help="samples for unconditional denoisers")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recipe)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, >= 1 (default: the recipe's)")
    ap.add_argument("--sampler", default=None,
                    help="override the recipe's solver: dpm_solver++ | adm | ddim (eps models), euler | heun | dopri5 (flow)")
    ap.add_argument("--seed", type=int, default=0)

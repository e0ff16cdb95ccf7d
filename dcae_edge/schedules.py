"""Diffusion schedules and samplers written once for every backend.

This module imports only numpy. The samplers use nothing but ``+ - *`` with Python floats on the
state ``x``, so the same code drives torch tensors (``dcae_edge.sample``) and numpy arrays
(``runtimes``: onnxruntime / OpenVINO / Core ML): both paths share the maths and the initial noise
(numpy's PCG64 from the seed), so they produce the same images up to floating-point error.

Conventions: the denoiser sees ``timestep`` in [0, 1000].
* flow ("rectified flow"): x_t = (1 - t) x0 + t eps, t in [0, 1], timestep = 1000 t,
  prediction = velocity eps - x0; Euler or Heun from t = 1 to 0.
* eps (DDPM): 1000 discrete steps with the U-ViT/DC-AE "scaled linear" betas
  (sqrt-linspace 0.00085 .. 0.012), prediction = eps; DPM-Solver++(2M) sampling.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def initial_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Starting noise for a seed, identical for every backend."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float64).astype(np.float32)


def ddpm_alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def flow_times(steps: int, shift: float = 1.0) -> np.ndarray:
    """steps + 1 times from 1 to 0; shift > 1 spends more steps at high noise (SD3 / SANA)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def sample_flow(model_fn: Callable, x, steps: int, method: str = "euler", shift: float = 1.0):
    """Integrate dx/dt = v(x, t) from t=1 (noise) to t=0 (data). ``model_fn(x, timestep)``."""
    if method not in ("euler", "heun"):
        raise ValueError(f"flow sampler must be 'euler' or 'heun', got {method!r}")
    ts = flow_times(steps, shift)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = model_fn(x, t * NUM_TRAIN_TIMESTEPS)
        if method == "heun" and t_next > 0:
            x_pred = x + (t_next - t) * v
            v_next = model_fn(x_pred, t_next * NUM_TRAIN_TIMESTEPS)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x + (t_next - t) * v
    return x


def ddpm_timesteps(steps: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must lie in [1, {num_train}], got {steps}")
    return np.linspace(num_train - 1, 0, steps + 1).round()[:-1].astype(np.int64)


def sample_dpmpp_2m(model_fn: Callable, x, steps: int = 30):
    """DPM-Solver++(2M) (Lu et al. 2022) on the discrete DDPM schedule, eps-prediction model.
    The last step returns the denoised estimate (final sigma 0)."""
    acp = ddpm_alphas_cumprod()
    ts = ddpm_timesteps(steps)
    alpha, sigma = np.sqrt(acp[ts]), np.sqrt(1 - acp[ts])
    lam = np.log(alpha) - np.log(sigma)
    prev_x0 = None
    for i, t in enumerate(ts):
        eps = model_fn(x, float(t))
        x0 = (x - float(sigma[i]) * eps) * float(1.0 / alpha[i])
        if i == steps - 1:
            return x0
        h = float(lam[i + 1] - lam[i])
        coef_x, coef_d = float(sigma[i + 1] / sigma[i]), float(-alpha[i + 1] * np.expm1(-h))
        if prev_x0 is None:  # first step: first order (DDIM)
            d = x0
        else:
            r = float(lam[i] - lam[i - 1]) / h
            d = x0 + (0.5 / r) * (x0 - prev_x0)
        x = coef_x * x + coef_d * d
        prev_x0 = x0
    return x


def trajectory_timesteps(prediction: str, steps: int) -> list[float]:
    """The timesteps (in [0, 1000]) a sampler visits: used to build realistic denoiser inputs."""
    if prediction == "flow":
        return [float(t) * NUM_TRAIN_TIMESTEPS for t in flow_times(steps)[:-1]]
    return [float(t) for t in ddpm_timesteps(steps)]


def sample(prediction: str, model_fn: Callable, x, steps: int, sampler: str | None = None, shift: float = 1.0):
    """Dispatch: flow models take ``euler`` (default) or ``heun``; eps models ``dpm++2m``."""
    if prediction == "flow":
        return sample_flow(model_fn, x, steps, sampler or "euler", shift)
    if sampler not in (None, "dpm++2m", "dpmpp_2m"):
        raise ValueError(f"eps-prediction models sample with 'dpm++2m', got {sampler!r}")
    return sample_dpmpp_2m(model_fn, x, steps)


def guided(cond, uncond, scale: float):
    """Classifier-free guidance: uncond + s (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def add_sampling_arguments(ap) -> None:
    """The sampling options shared by the torch CLI (``dcae_edge.sample``) and the app CLI
    (``runtimes.generate``), so both sample the same way by default."""
    ap.add_argument("--classes", type=int, nargs="*", default=None, help="class ids (class-conditional denoisers)")
    ap.add_argument("--n", type=int, default=4, help="samples for unconditional denoisers")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--sampler", default=None, help="euler | heun (flow models), dpm++2m (eps models)")
    ap.add_argument("--seed", type=int, default=0)

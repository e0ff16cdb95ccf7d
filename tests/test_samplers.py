"""The numpy samplers (dcae_edge.schedules) against independent implementations: diffusers'
schedulers configured the same way, torchdiffeq's dopri5, a hand-written port of the DPM-Solver
code the released U-ViT models were sampled with, and closed-form oracles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcae_edge import schedules as S

SCALED = {"schedule": "scaled_linear", "start": 0.00085, "end": 0.012, "num_train_timesteps": 1000}
LINEAR = {"schedule": "linear", "start": 0.0001, "end": 0.02, "num_train_timesteps": 1000}


def toy_eps(x, t):
    """A smooth, time-dependent stand-in for a denoiser (numpy or torch)."""
    tanh = np.tanh if isinstance(x, np.ndarray) else torch.tanh
    return 0.4 * x * math.cos(t / 350.0) + 0.2 * math.sin(t / 90.0) + 0.1 * tanh(x)


def run_diffusers(scheduler, x, steps, model=toy_eps, **step_kw):
    scheduler.set_timesteps(steps) if "timesteps" not in step_kw else scheduler.set_timesteps(timesteps=step_kw.pop("timesteps"))
    x = torch.as_tensor(x, dtype=torch.float64)
    for t in scheduler.timesteps:
        out = model(x, float(t))
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x.numpy()


def vp_recipe(solver: dict, betas=SCALED, offset=1) -> dict:
    return {"kind": "vp", "betas": betas, "prediction": "eps", "timestep": {"type": "continuous", "offset": offset},
            "solver": solver, "steps": 20}


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [12, 13, 14])
def test_dpm_solver_singlestep_order3_equals_diffusers(solver_type, steps):
    from diffusers import DPMSolverSinglestepScheduler

    x = S.initial_noise((2, 3, 4, 4), 0).astype(np.float64)
    sched = DPMSolverSinglestepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         algorithm_type="dpmsolver++", solver_order=3, solver_type=solver_type,
                                         lower_order_final=True, final_sigmas_type="sigma_min")
    ref = run_diffusers(sched, x, steps)
    recipe = vp_recipe({"name": "dpm_solver++", "method": "singlestep", "order": 3, "skip_type": "discrete",
                        "final": "sigma_min", "solver_type": solver_type})
    ours = S.run(recipe, toy_eps, x, steps)
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)  # diffusers keeps sigmas in float32


@pytest.mark.parametrize("order,steps", [(2, 10), (2, 20), (3, 10), (3, 25)])
def test_dpm_solver_multistep_equals_diffusers(order, steps):
    from diffusers import DPMSolverMultistepScheduler

    x = S.initial_noise((2, 3, 4, 4), 1).astype(np.float64)
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint",
                                        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")
    ref = run_diffusers(sched, x, steps)
    recipe = vp_recipe({"name": "dpm_solver++", "method": "multistep", "order": order, "skip_type": "discrete",
                        "final": "denoise", "solver_type": "midpoint"})
    np.testing.assert_allclose(S.run(recipe, toy_eps, x, steps), ref, rtol=2e-5, atol=2e-5)


def test_adm_ancestral_with_learned_variance_equals_diffusers_ddpm():
    """DiT's sampler: 250 respaced ADM steps, learned-range variance, fresh noise each step."""
    from diffusers import DDPMScheduler

    c = 3
    x = S.initial_noise((2, c, 4, 4), 2).astype(np.float64)

    acp = np.cumprod(1 - S.betas_for(LINEAR))

    def model(x, t):  # eps of a point mass at 0.5 (plus a wiggle) + variance channels in [-1, 1]
        eps = (x - math.sqrt(acp[int(t)]) * 0.5) / math.sqrt(1 - acp[int(t)]) + 0.05 * toy_eps(x, t)
        v = 0.8 * np.tanh(x * math.sin(t / 200.0)) if isinstance(x, np.ndarray) else 0.8 * torch.tanh(x * math.sin(t / 200.0))
        return np.concatenate([eps, v], 1) if isinstance(x, np.ndarray) else torch.cat([eps, v], 1)

    steps = S.respaced_steps(1000, 250)
    assert steps[:4] == [0, 4, 8, 12] and steps[-1] == 999 and len(steps) == 250
    sched = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, variance_type="learned_range",
                          clip_sample=False)
    g = torch.Generator().manual_seed(0)
    ref = run_diffusers(sched, x, None, model=model, timesteps=steps[::-1], generator=g)
    g2 = torch.Generator().manual_seed(0)
    recipe = {"kind": "vp", "betas": LINEAR, "prediction": "eps", "timestep": {"type": "index", "offset": 0},
              "solver": {"name": "adm", "variance": "learned_range"}}
    ours = S.run(recipe, model, x, 250, channels=c,
                 noise_fn=lambda shape: torch.randn(shape, generator=g2, dtype=torch.float64).numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)  # diffusers: float32 schedule tables
    assert np.abs(ours).max() < 5


def test_ddim_equals_diffusers():
    from diffusers import DDIMScheduler

    x = S.initial_noise((1, 3, 4, 4), 3).astype(np.float64)
    # full-length schedule: ADM respacing and diffusers' fixed stride coincide
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="leading")
    ref = run_diffusers(sched, x, 1000, eta=0.0)
    recipe = {"kind": "vp", "betas": LINEAR, "prediction": "eps", "timestep": {"type": "index", "offset": 0},
              "solver": {"name": "ddim"}}
    np.testing.assert_allclose(S.run(recipe, toy_eps, x, 1000), ref, rtol=1e-5, atol=1e-5)


def ev_uvit_dpm_solver(model_eps, x, steps=30, t_end=1e-3):
    """A direct port of the DPM-Solver code the released U-ViT models were evaluated with
    (efficientvit uvit_sampler/dpm_solver_pp.py, method "fast", order 3, time-uniform, predict_x0,
    solver_type "dpm_solver"): intermediate times from inverse_lambda, the r2/r1 * phi_22 term."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    t_knots = np.linspace(1 / 1000, 1.0, 1000)
    la_knots = 0.5 * np.cumsum(np.log(1 - betas))

    def interp(v, xp, yp):
        j = np.clip(np.searchsorted(xp, v) - 1, 0, len(xp) - 2)
        return yp[j] + (v - xp[j]) * (yp[j + 1] - yp[j]) / (xp[j + 1] - xp[j])

    la = lambda t: interp(t, t_knots, la_knots)  # noqa: E731
    std = lambda t: math.sqrt(1 - math.exp(2 * la(t)))  # noqa: E731
    lam = lambda t: la(t) - 0.5 * math.log(1 - math.exp(2 * la(t)))  # noqa: E731

    def inv_lam(lmb):
        return interp(-0.5 * np.logaddexp(0, -2 * lmb), la_knots[::-1].copy(), t_knots[::-1].copy())

    def x0(x, t):
        return (x - std(t) * model_eps(x, t * 1000)) / math.exp(la(t))

    k = steps // 3 + 1
    orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else ([3] * (k - 1) + [1] if steps % 3 == 1 else [3] * (k - 1) + [2])
    ts = np.linspace(1.0, t_end, steps + 1)
    i = 0
    for order in orders:
        s, t = ts[i], ts[i + order]
        h = lam(t) - lam(s)
        m_s = x0(x, s)
        if order == 1:
            x = (std(t) / std(s)) * x - math.exp(la(t)) * math.expm1(-h) * m_s
        elif order == 2:
            r1 = (lam(ts[i + 1]) - lam(s)) / h
            s1 = inv_lam(lam(s) + r1 * h)
            x1 = (std(s1) / std(s)) * x - math.exp(la(s1)) * math.expm1(-r1 * h) * m_s
            m1 = x0(x1, s1)
            phi1 = math.expm1(-h)
            x = (std(t) / std(s)) * x - math.exp(la(t)) * phi1 * m_s - (0.5 / r1) * math.exp(la(t)) * phi1 * (m1 - m_s)
        else:
            r1, r2 = (lam(ts[i + 1]) - lam(s)) / h, (lam(ts[i + 2]) - lam(s)) / h
            s1, s2 = inv_lam(lam(s) + r1 * h), inv_lam(lam(s) + r2 * h)
            x1 = (std(s1) / std(s)) * x - math.exp(la(s1)) * math.expm1(-r1 * h) * m_s
            m1 = x0(x1, s1)
            phi22 = math.expm1(-r2 * h) / (r2 * h) + 1
            x2 = (std(s2) / std(s)) * x - math.exp(la(s2)) * math.expm1(-r2 * h) * m_s + r2 / r1 * math.exp(la(s2)) * phi22 * (m1 - m_s)
            m2 = x0(x2, s2)
            phi1 = math.expm1(-h)
            x = (std(t) / std(s)) * x - math.exp(la(t)) * phi1 * m_s + (1 / r2) * math.exp(la(t)) * (phi1 / h + 1) * (m2 - m_s)
        i += order
    return x


@pytest.mark.parametrize("steps", [30, 10, 11])
def test_released_uvit_recipe_equals_the_reference_dpm_solver(steps):
    from dcae_edge.official import UVIT_DPM

    x = S.initial_noise((2, 4, 3, 3), 4).astype(np.float64)
    seen = []

    def model(x, t):
        seen.append(t)
        return toy_eps(x, t)

    ours = S.run(UVIT_DPM, model, x, steps)
    np.testing.assert_allclose(ours, ev_uvit_dpm_solver(toy_eps, x, steps), rtol=1e-9, atol=1e-9)
    # one model call per step, at 1000 t on the time-uniform grid (1-indexed: the first is exactly 1000)
    assert len(seen) == steps and seen[0] == pytest.approx(1000.0)
    assert seen[-1] == pytest.approx(1000 * (1 - (steps - 1) * (1 - 1e-3) / steps))


def test_dopri5_equals_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x = S.initial_noise((2, 3, 4, 4), 5).astype(np.float64)
    field = lambda y, t: np.sin(3 * t) * y + 0.3 * np.cos(y) - 0.5 * t  # noqa: E731
    ref = torchdiffeq.odeint(lambda t, y: torch.sin(3 * t) * y + 0.3 * torch.cos(y) - 0.5 * t, torch.from_numpy(x),
                             torch.linspace(0, 1, 250, dtype=torch.float64), method="dopri5", atol=1e-6, rtol=1e-3)[-1]
    nfe = []
    ours = S.sample_dopri5(lambda y, t: (nfe.append(t), field(y, t))[1], x, 1e-6, 1e-3)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-7, atol=1e-7)
    assert 10 < len(nfe) < 500


@pytest.mark.parametrize("time", ["noise_level", "data_level"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_flow_samplers_follow_each_time_convention(time, solver):
    """A point-mass data distribution: the exact velocity is known, every solver must land on it."""
    data = np.full((2, 3, 4, 4), 0.7)

    def model(x, t):  # ours: t' = 1000 s, predicts noise - data; SiT: raw t = 1 - s, predicts data - noise
        s = t / 1000.0 if time == "noise_level" else 1.0 - t
        noise = (x - (1 - s) * data) / max(s, 1e-12)
        return noise - data if time == "noise_level" else data - noise

    recipe = {"kind": "flow", "time": time, "timestep_scale": 1000.0 if time == "noise_level" else 1.0, "solver": {"name": solver}}
    out = S.run(recipe, model, S.initial_noise(data.shape, 6).astype(np.float64), 8)
    # fixed steps integrate the straight path exactly; dopri5 to its tolerance (rtol 1e-3)
    np.testing.assert_allclose(out, data, atol=1e-6 if solver != "dopri5" else 2e-3)


def test_dpm_solver_oracle_recovers_the_data():
    """eps of a point mass is exact: DPM-Solver++ in data-prediction form returns the point."""
    data = np.full((1, 2, 3, 3), -0.4)
    acp = S.ddpm_alphas_cumprod()

    def oracle(x, t):  # ours are 0-indexed: model time t = index
        i = int(round(t))
        return (x - math.sqrt(acp[i]) * data) / math.sqrt(1 - acp[i])

    out = S.run(S.recipe_ours("eps"), oracle, S.initial_noise(data.shape, 7).astype(np.float64), 15)
    np.testing.assert_allclose(out, data, atol=1e-9)


def test_guidance_keeps_variance_channels_of_the_conditional_half():
    cond, uncond = np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1))
    cond[:, 2:] = 5.0
    out = S.guided(cond, uncond, 1.5, channels=2)
    assert out[:, :2].tolist() == [[[[1.5]], [[1.5]]]] and out[:, 2:].tolist() == [[[[5.0]], [[5.0]]]]
    t = S.guided(torch.from_numpy(cond), torch.from_numpy(uncond), 1.5, channels=2)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(out))


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_steps_and_cfg_are_refused(bad):
    if bad is not None:
        with pytest.raises(S.SamplerError, match="steps"):
            S.check_options(bad, 1.0)
    for cfg in (0.5, float("nan"), -1.0):
        with pytest.raises(S.SamplerError, match="cfg"):
            S.check_options(10, cfg)
    with pytest.raises(S.SamplerError, match="does not apply"):
        S.with_solver(S.recipe_ours("flow"), "adm")
    with pytest.raises(S.SamplerError, match="unknown sampler kind"):
        S.run({"kind": "sde", "solver": {"name": "x"}}, toy_eps, np.zeros((1, 1, 1, 1)))


def test_initial_and_step_noise_are_seeded_and_independent():
    a, b = S.initial_noise((2, 3), 5), S.initial_noise((2, 3), 5)
    assert np.array_equal(a, b) and not np.array_equal(a, S.initial_noise((2, 3), 6))
    f, g = S.step_noise(5), S.step_noise(5)
    first = f((2, 3))
    assert np.array_equal(first, g((2, 3))) and not np.array_equal(first, a) and not np.array_equal(first, f((2, 3)))

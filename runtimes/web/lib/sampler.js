// The samplers of dcae_edge/schedules.py, line for line, driven by the bundle manifest's recipe
// (manifest.sampler). Tensors are Float32Array in NCHW order; coefficients are float64 numbers.
// The model function is async (onnxruntime-web runs return promises): modelFn(x, t) -> Float32Array
// of the model output (prediction channels first; DiT adds C learned-variance channels).

import { initialNoise, stepNoise } from "./noise.js";

export class SamplerError extends Error {}

const SOLVERS = { vp: ["dpm_solver++", "adm", "ddim"], flow: ["euler", "heun", "dopri5"] };

// ------------------------------------------------------------------------------------------ tensors
function lin(...terms) { // lin([a, x], [b, y], ...) = a x + b y + ...  (x may be a scalar number)
  const n = terms.find(([, v]) => typeof v !== "number")[1].length;
  const out = new Float32Array(n);
  for (const [a, v] of terms) {
    if (typeof v === "number") { for (let i = 0; i < n; i++) out[i] += a * v; }
    else { for (let i = 0; i < n; i++) out[i] += a * v[i]; }
  }
  return out;
}

function channelsOf(out, n, outC, hw, c, from = 0) { // channels [from, from + c) of every sample
  const r = new Float32Array(n * c * hw);
  for (let b = 0; b < n; b++) r.set(out.subarray((b * outC + from) * hw, (b * outC + from + c) * hw), b * c * hw);
  return r;
}

// ------------------------------------------------------------------------------------------ recipes
export function withSolver(recipe, name) {
  if (!name) return recipe;
  name = { "dpm++2m": "dpm_solver++", dpmpp_2m: "dpm_solver++", "dpm++": "dpm_solver++" }[name] || name;
  const kind = recipe.kind;
  if (!SOLVERS[kind].includes(name)) {
    throw new SamplerError(`sampler '${name}' does not apply to this ${kind === "flow" ? "flow" : "eps (VP)"} model; ` +
      `choose one of ${SOLVERS[kind].join(", ")}`);
  }
  if (name === recipe.solver.name) return recipe;
  const defaults = { "dpm_solver++": { method: "multistep", order: 2, skip_type: "time_uniform", t_end: 1e-3 },
    adm: {}, ddim: {}, euler: {}, heun: {}, dopri5: { atol: 1e-6, rtol: 1e-3 } };
  return { ...recipe, solver: { name, ...defaults[name] } };
}

export function validateRecipe(recipe) {
  if (!recipe || !(recipe.kind in SOLVERS)) {
    throw new SamplerError(`unknown sampler kind '${recipe && recipe.kind}' (expected 'vp' or 'flow'); ` +
      "the bundle was written by a newer dcae-edge or edited by hand");
  }
  const name = recipe.solver && recipe.solver.name;
  if (!SOLVERS[recipe.kind].includes(name)) {
    throw new SamplerError(`unknown ${recipe.kind} solver '${name}'; known: ${SOLVERS[recipe.kind].join(", ")}`);
  }
}

export function checkOptions(steps, cfgScale) {
  if (steps !== undefined && steps !== null && (!Number.isInteger(steps) || steps < 1)) {
    throw new SamplerError(`steps must be an integer >= 1, got ${steps}`);
  }
  if (cfgScale !== undefined && cfgScale !== null && !(Number.isFinite(cfgScale) && cfgScale >= 1)) {
    throw new SamplerError(`cfg scale must be a finite number >= 1 (1 = no guidance), got ${cfgScale}`);
  }
}

// ------------------------------------------------------------------------------------------ VP schedule
function linspace(a, b, n) {
  if (n === 1) return [a];
  const out = new Array(n);
  const step = (b - a) / (n - 1);
  for (let i = 0; i < n; i++) out[i] = a + i * step;
  out[n - 1] = b;
  return out;
}

export function betasFor(spec) {
  const n = spec.num_train_timesteps || 1000;
  if (spec.schedule === "scaled_linear") return linspace(Math.sqrt(spec.start), Math.sqrt(spec.end), n).map((v) => v * v);
  if (spec.schedule === "linear") return linspace(spec.start, spec.end, n);
  throw new SamplerError(`unknown beta schedule '${spec.schedule}' (scaled_linear | linear)`);
}

function cumprod1m(betas) {
  const out = new Array(betas.length);
  let p = 1;
  for (let i = 0; i < betas.length; i++) { p *= 1 - betas[i]; out[i] = p; }
  return out;
}

function interp(x, xp, yp) { // piecewise linear, linear extrapolation (xp ascending)
  let lo = 0, hi = xp.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (xp[mid] < x) lo = mid + 1; else hi = mid; }
  const j = Math.min(Math.max(lo - 1, 0), xp.length - 2);
  return yp[j] + (x - xp[j]) * (yp[j + 1] - yp[j]) / (xp[j + 1] - xp[j]);
}

class DiscreteVP {
  constructor(acp) {
    this.n = acp.length;
    this.t = acp.map((_, i) => (i + 1) / this.n);
    this.la = acp.map((a) => 0.5 * Math.log(a));
    this.laRev = [...this.la].reverse();
    this.tRev = [...this.t].reverse();
  }
  logAlpha(t) { return interp(t, this.t, this.la); }
  alphaSigma(t) { const la = this.logAlpha(t); return [Math.exp(la), Math.sqrt(-Math.expm1(2 * la))]; }
  lam(t) { const la = this.logAlpha(t); return la - 0.5 * Math.log(-Math.expm1(2 * la)); }
  inverseLambda(l) {
    const la = -0.5 * (Math.max(0, -2 * l) + Math.log1p(Math.exp(-Math.abs(-2 * l))));
    return interp(la, this.laRev, this.tRev);
  }
}

function point(alpha, sigma, modelT) {
  return { alpha, sigma, modelT, lam: sigma === 0 ? Infinity : Math.log(alpha) - Math.log(sigma) };
}

export function vpGrid(recipe, steps) {
  const solver = recipe.solver;
  const acp = cumprod1m(betasFor(recipe.betas));
  const n = acp.length;
  const ts = recipe.timestep || { type: "continuous", offset: 0 };
  const off = ts.offset || 0;
  const skip = solver.skip_type || "time_uniform";
  if (skip === "discrete") {
    if (!(steps >= 1 && steps <= n)) throw new SamplerError(`steps must lie in [1, ${n}], got ${steps}`);
    const idx = linspace(0, n - 1, steps + 1).map(roundHalfEven).reverse().slice(0, steps);
    const pts = idx.map((i) => point(Math.sqrt(acp[i]), Math.sqrt(1 - acp[i]), i + 1 - off));
    pts.push((solver.final || "denoise") === "denoise" ? point(1, 0, null) : point(Math.sqrt(acp[0]), Math.sqrt(1 - acp[0]), null));
    return pts;
  }
  const vp = new DiscreteVP(acp);
  const tEnd = solver.t_end !== undefined ? solver.t_end : 1 / n;
  let t;
  if (skip === "time_uniform") t = linspace(1, tEnd, steps + 1);
  else if (skip === "logSNR") t = linspace(vp.lam(1), vp.lam(tEnd), steps + 1).map((l) => vp.inverseLambda(l));
  else if (skip === "time_quadratic") t = linspace(1, Math.sqrt(tEnd), steps + 1).map((v) => v * v);
  else throw new SamplerError(`unknown skip_type '${skip}'`);
  const pts = t.map((tt) => { const [a, s] = vp.alphaSigma(tt); return point(a, s, tt * n - off); });
  if (solver.final === "denoise") pts.push(point(1, 0, null));
  return pts;
}

export function fastOrders(steps, order) {
  if (order === 3) {
    const k = Math.floor(steps / 3) + 1;
    if (steps % 3 === 0) return [...Array(k - 2).fill(3), 2, 1];
    return steps % 3 === 1 ? [...Array(k - 1).fill(3), 1] : [...Array(k - 1).fill(3), 2];
  }
  if (order === 2) return steps % 2 === 0 ? Array(steps / 2).fill(2) : [...Array((steps - 1) / 2).fill(2), 1];
  if (order === 1) return Array(steps).fill(1);
  throw new SamplerError(`DPM-Solver order must be 1, 2 or 3, got ${order}`);
}

function first(x, s, t, ms) {
  if (t.sigma === 0) return lin([t.alpha, ms]);
  const h = t.lam - s.lam;
  return lin([t.sigma / s.sigma, x], [-t.alpha * Math.expm1(-h), ms]);
}

function second(x, s, t, ms, m1, r, kind) {
  if (t.sigma === 0) return first(x, s, t, ms);
  const h = t.lam - s.lam, phi1 = Math.expm1(-h);
  if (kind === "midpoint") return lin([t.sigma / s.sigma, x], [-t.alpha * phi1, ms], [-(0.5 / r) * t.alpha * phi1, m1], [(0.5 / r) * t.alpha * phi1, ms]);
  const c = (1 / r) * t.alpha * (phi1 / h + 1);
  return lin([t.sigma / s.sigma, x], [-t.alpha * phi1, ms], [c, m1], [-c, ms]);
}

function third(x, s, t, ms, m1, m2, r1, r2, kind) {
  if (t.sigma === 0) return first(x, s, t, ms);
  const h = t.lam - s.lam, phi1 = Math.expm1(-h), phi2 = phi1 / h + 1;
  const base = [[t.sigma / s.sigma, x], [-t.alpha * phi1, ms]];
  if (kind === "midpoint") { const c = (1 / r2) * t.alpha * phi2; return lin(...base, [c, m2], [-c, ms]); }
  // taylor: D1 = (r2 D1_0 - r1 D1_1) / (r2 - r1), D2 = 2 (D1_1 - D1_0) / (r2 - r1), D1_0 = (m1 - ms)/r1, D1_1 = (m2 - ms)/r2
  const a1 = t.alpha * phi2, a2 = t.alpha * (phi2 / h - 0.5);
  const d10 = 1 / r1, d11 = 1 / r2;
  const cD1m1 = (r2 * d10) / (r2 - r1), cD1m2 = (-r1 * d11) / (r2 - r1);
  const cD2m1 = (-2 / (r2 - r1)) * d10, cD2m2 = (2 / (r2 - r1)) * d11;
  const c1 = a1 * cD1m1 - a2 * cD2m1, c2 = a1 * cD1m2 - a2 * cD2m2;
  return lin(...base, [c1, m1], [c2, m2], [-(c1 + c2), ms]);
}

const SINGLESTEP_KINDS = { dpm_solver: ["taylor", "midpoint", "midpoint"], midpoint: ["midpoint", "midpoint", "midpoint"],
  heun: ["taylor", "taylor", "taylor"] };

async function dpmSingle(x0Fn, x, pts, orders, solverType, onStep) {
  const [inter2, final2, final3] = SINGLESTEP_KINDS[solverType];
  let i = 0;
  for (const k of orders) {
    const s = pts[i], t = pts[i + k];
    const ms = await x0Fn(x, s);
    if (k === 1) x = first(x, s, t, ms);
    else {
      const p1 = pts[i + 1], h = t.lam - s.lam;
      const r1 = (p1.lam - s.lam) / h;
      const m1 = await x0Fn(first(x, s, p1, ms), p1);
      if (k === 2) x = second(x, s, t, ms, m1, r1, final2);
      else {
        const p2 = pts[i + 2];
        const r2 = (p2.lam - s.lam) / h;
        const x2 = second(x, s, p2, ms, m1, (p1.lam - s.lam) / (p2.lam - s.lam), inter2);
        const m2 = await x0Fn(x2, p2);
        x = third(x, s, t, ms, m1, m2, r1, r2, final3);
      }
    }
    i += k;
    if (onStep) onStep(i, pts.length - 1);
  }
  return x;
}

async function dpmMulti(x0Fn, x, pts, order, solverType, lowerOrderFinal, onStep) {
  const steps = pts.length - 1;
  let hist = [];
  for (let i = 0; i < steps; i++) {
    const s = pts[i], t = pts[i + 1];
    const m = await x0Fn(x, s);
    hist = [...hist, [s, m]].slice(-3);
    const last = i === steps - 1;
    const finalLow = last && lowerOrderFinal && (steps < 15 || t.sigma === 0);
    const secondLow = i === steps - 2 && lowerOrderFinal && steps < 15;
    if (order === 1 || hist.length < 2 || finalLow) x = first(x, s, t, m);
    else if (order === 2 || hist.length < 3 || secondLow) {
      const [[p1, m1], [p0, m0]] = hist.slice(-2);
      const h = t.lam - p0.lam, r0 = (p0.lam - p1.lam) / h, phi1 = Math.expm1(-h);
      const c = solverType === "midpoint" ? -0.5 * t.alpha * phi1 / r0 : t.alpha * (phi1 / h + 1) / r0;
      x = lin([t.sigma / p0.sigma, x], [-t.alpha * phi1, m0], [c, m0], [-c, m1]);
    } else {
      const [[p2, m2], [p1, m1], [p0, m0]] = hist;
      const h = t.lam - p0.lam, r0 = (p0.lam - p1.lam) / h, r1 = (p1.lam - p2.lam) / h;
      const phi1 = Math.expm1(-h), phi2 = phi1 / h + 1, a1 = t.alpha * phi2, a2 = t.alpha * (phi2 / h - 0.5);
      // d1_0 = (m0 - m1)/r0, d1_1 = (m1 - m2)/r1, d1 = d1_0 + r0/(r0+r1) (d1_0 - d1_1), d2 = (d1_0 - d1_1)/(r0+r1)
      const k = r0 / (r0 + r1), q = 1 / (r0 + r1);
      const cD1_10 = 1 + k, cD1_11 = -k; // d1 = cD1_10 d1_0 + cD1_11 d1_1
      const c10 = a1 * cD1_10 - a2 * q, c11 = a1 * cD1_11 + a2 * q; // coefficients of d1_0, d1_1
      x = lin([t.sigma / p0.sigma, x], [-t.alpha * phi1, m0], [c10 / r0, m0], [-c10 / r0, m1], [c11 / r1, m1], [-c11 / r1, m2]);
    }
    if (onStep) onStep(i + 1, steps);
  }
  return x;
}

// ------------------------------------------------------------------------------------------ ADM / DDIM
function roundHalfEven(v) {
  const f = Math.floor(v), d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

export function respacedSteps(numTrain, steps) {
  if (!(steps >= 1 && steps <= numTrain)) throw new SamplerError(`steps must lie in [1, ${numTrain}], got ${steps}`);
  if (steps === 1) return [0];
  const stride = (numTrain - 1) / (steps - 1);
  let cur = 0;
  const out = new Set();
  for (let i = 0; i < steps; i++) { out.add(roundHalfEven(cur)); cur += stride; }
  return [...out].sort((a, b) => a - b);
}

function admTables(recipe, steps) {
  const full = cumprod1m(betasFor(recipe.betas));
  const use = respacedSteps(full.length, steps);
  const acp = use.map((i) => full[i]);
  const prev = [1, ...acp.slice(0, -1)];
  const betas = acp.map((a, i) => 1 - a / prev[i]);
  const post = betas.map((b, i) => b * (1 - prev[i]) / (1 - acp[i]));
  const minLog = use.length > 1 ? [post[1], ...post.slice(1)].map(Math.log) : post.map((v) => Math.log(Math.max(v, 1e-20)));
  return { use, acp, prev, betas, minLog, maxLog: betas.map(Math.log),
    cx0: betas.map((b, i) => b * Math.sqrt(prev[i]) / (1 - acp[i])),
    cxt: betas.map((b, i) => (1 - prev[i]) * Math.sqrt(1 - b) / (1 - acp[i])) };
}

// ------------------------------------------------------------------------------------------ flow
function flowTimes(steps, shift = 1) {
  return linspace(1, 0, steps + 1).map((t) => shift * t / (1 + (shift - 1) * t));
}

const DP_C = [1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1];
const DP_A = [[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9], [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
  [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656], [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]];
const DP_ERR = [35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
  -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60];
const DP_MID = [6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
  187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2];

function rms(a) { let s = 0; for (let i = 0; i < a.length; i++) s += a[i] * a[i]; return Math.sqrt(s / a.length); }

async function dopri5(field, x, atol, rtol, onStep) {
  const f0 = await field(x, 0);
  const scale = Float64Array.from(x, (v) => atol + rtol * Math.abs(v));
  const d0 = rms(Float64Array.from(x, (v, i) => v / scale[i])), d1 = rms(Float64Array.from(f0, (v, i) => v / scale[i]));
  const h0 = d0 < 1e-5 || d1 < 1e-5 ? 1e-6 : 0.01 * d0 / d1;
  const f1 = await field(lin([1, x], [h0, f0]), h0);
  const d2 = rms(Float64Array.from(f1, (v, i) => (v - f0[i]) / scale[i])) / h0;
  const h1 = d1 <= 1e-15 && d2 <= 1e-15 ? Math.max(1e-6, h0 * 1e-3) : Math.pow(0.01 / Math.max(d1, d2), 1 / 5);
  let dt = Math.min(100 * h0, h1), t0 = 0, t1 = 0, y = x, f = f0, n = 0;
  let yPrev = x, fPrev = f0, yMid = x, dtAcc = dt;
  while (t1 < 1) {
    if (++n > 10000) throw new SamplerError("dopri5 took more than 10000 steps");
    const k = [f];
    let yi = y;
    for (let s = 0; s < 6; s++) {
      const terms = [[1, y]];
      DP_A[s].forEach((a, j) => { if (a) terms.push([dt * a, k[j]]); });
      yi = lin(...terms);
      k.push(await field(yi, t1 + DP_C[s] * dt));
    }
    const yNew = yi, fNew = k[6];
    const errTerms = [];
    DP_ERR.forEach((e, j) => { if (e) errTerms.push([dt * e, k[j]]); });
    const err = lin(...errTerms);
    let acc = 0;
    for (let i = 0; i < err.length; i++) {
      const tol = atol + rtol * Math.max(Math.abs(y[i]), Math.abs(yNew[i]));
      acc += (err[i] / tol) ** 2;
    }
    const ratio = Math.sqrt(acc / err.length);
    if (ratio <= 1) {
      const mt = [[1, y]];
      DP_MID.forEach((c, j) => { if (c) mt.push([dt * c, k[j]]); });
      yPrev = y; fPrev = f; yMid = lin(...mt); dtAcc = dt;
      t0 = t1; t1 = t1 + dt; y = yNew; f = fNew;
      if (onStep) onStep(Math.min(t1, 1), 1);
    }
    dt = dt * (ratio === 0 ? 10 : Math.min(10, Math.max(0.9 / Math.pow(ratio, 0.2), ratio < 1 ? 1 : 0.2)));
  }
  if (t1 === 1) return y;
  const s = (1 - t0) / (t1 - t0);
  const a = lin([2 * dtAcc, f], [-2 * dtAcc, fPrev], [-8, y], [-8, yPrev], [16, yMid]);
  const b = lin([5 * dtAcc, fPrev], [-3 * dtAcc, f], [18, yPrev], [14, y], [-32, yMid]);
  const c = lin([dtAcc, f], [-4 * dtAcc, fPrev], [-11, yPrev], [-5, y], [16, yMid]);
  return lin([1, yPrev], [s * dtAcc, fPrev], [s * s, c], [s ** 3, b], [s ** 4, a]);
}

// ------------------------------------------------------------------------------------------ entry points
/**
 * Sample from noise x (Float32Array, shape [n, c, h, w]) with modelFn(x, t) -> Float32Array (CFG applied).
 * `dims` = {n, c, h, w, outC}; noiseFn(size) for ancestral steps; onStep(done, total) for progress.
 */
export async function run(recipe, modelFn, x, steps, dims, noiseFn = null, onStep = null) {
  validateRecipe(recipe);
  steps = steps || recipe.steps || 30;
  checkOptions(steps, null);
  const { n, c, h, w } = dims;
  const hw = h * w;
  const pred = async (y, t) => {
    const out = await modelFn(y, t);
    const outC = out.length / (n * hw);
    return outC === c ? out : channelsOf(out, n, outC, hw, c);
  };
  const solver = recipe.solver;
  if (recipe.kind === "flow") {
    const scale = recipe.timestep_scale !== undefined ? recipe.timestep_scale : 1000;
    const noiseLevel = (recipe.time || "noise_level") === "noise_level";
    const velocity = noiseLevel ? (y, s) => pred(y, s * scale)
      : async (y, s) => lin([-1, await pred(y, (1 - s) * scale)]);
    if (solver.name === "dopri5") {
      return dopri5(async (y, t) => lin([-1, await velocity(y, 1 - t)]), x, solver.atol ?? 1e-6, solver.rtol ?? 1e-3, onStep);
    }
    const ss = flowTimes(steps, solver.shift || 1);
    for (let i = 0; i < steps; i++) {
      const s = ss[i], sn = ss[i + 1];
      const v = await velocity(x, s);
      if (solver.name === "heun" && sn > 0) {
        const v2 = await velocity(lin([1, x], [sn - s, v]), sn);
        x = lin([1, x], [(sn - s) * 0.5, v], [(sn - s) * 0.5, v2]);
      } else x = lin([1, x], [sn - s, v]);
      if (onStep) onStep(i + 1, steps);
    }
    return x;
  }
  const off = (recipe.timestep || {}).offset || 0;
  if (solver.name === "adm" || solver.name === "ddim") {
    const tab = admTables(recipe, steps);
    const total = tab.use.length;
    for (let i = total - 1; i >= 0; i--) {
      const out = await modelFn(x, tab.use[i] + off);
      const outC = out.length / (n * hw);
      const eps = outC === c ? out : channelsOf(out, n, outC, hw, c);
      if (solver.name === "ddim") {
        const a = tab.acp[i], ap = tab.prev[i];
        const x0 = lin([1 / Math.sqrt(a), x], [-Math.sqrt(1 - a) / Math.sqrt(a), eps]);
        x = lin([Math.sqrt(ap), x0], [Math.sqrt(1 - ap), eps]);
      } else {
        const x0 = lin([Math.sqrt(1 / tab.acp[i]), x], [-Math.sqrt(1 / tab.acp[i] - 1), eps]);
        const mean = lin([tab.cx0[i], x0], [tab.cxt[i], x]);
        if (i === 0) { x = mean; }
        else {
          if (!noiseFn) throw new SamplerError("ancestral sampling needs a noise source");
          const z = noiseFn(x.length);
          x = new Float32Array(x.length);
          if (outC >= 2 * c) {
            const v = channelsOf(out, n, outC, hw, c, c);
            for (let j = 0; j < x.length; j++) {
              const frac = (v[j] + 1) * 0.5;
              const lv = frac * tab.maxLog[i] + (1 - frac) * tab.minLog[i];
              x[j] = mean[j] + Math.exp(0.5 * lv) * z[j];
            }
          } else {
            const sd = Math.exp(0.5 * tab.minLog[i]);
            for (let j = 0; j < x.length; j++) x[j] = mean[j] + sd * z[j];
          }
        }
      }
      if (onStep) onStep(total - i, total);
    }
    return x;
  }
  const pts = vpGrid(recipe, steps);
  const x0Fn = async (y, p) => {
    const eps = await pred(y, p.modelT);
    return lin([1 / p.alpha, y], [-p.sigma / p.alpha, eps]);
  };
  if ((solver.method || "multistep") === "singlestep") {
    return dpmSingle(x0Fn, x, pts, fastOrders(pts.length - 1, solver.order || 3), solver.solver_type || "dpm_solver", onStep);
  }
  return dpmMulti(x0Fn, x, pts, solver.order || 2, solver.solver_type || "midpoint", solver.lower_order_final !== false, onStep);
}

/**
 * The twin of dcae_edge.schedules.generate_numpy: CFG batches [cond, null], portable noise.
 * runGraph(feeds) -> Promise<Float32Array> runs the transformer (feeds: hidden_states Float32Array,
 * timestep Float32Array, class_labels BigInt64Array, with `batch`).
 */
export async function generate(recipe, runGraph, { labels = null, n = 1, steps = null, cfgScale = null, seed = 0,
  latents = null, sampler = null, onStep = null, staticBatch = null } = {}) {
  recipe = withSolver(recipe, sampler);
  steps = steps ?? recipe.steps ?? 30;
  cfgScale = cfgScale ?? recipe.cfg_scale ?? 1;
  checkOptions(steps, cfgScale);
  const [c, h, w] = recipe.latent_shape;
  const nul = recipe.null_class ?? 0;
  const conditional = labels !== null && labels !== undefined;
  if (conditional) n = labels.length;
  else if (cfgScale !== 1) throw new SamplerError("classifier-free guidance needs a class-conditional denoiser; use cfg 1");
  const useCfg = conditional && cfgScale !== 1;
  const per = c * h * w;
  const cfgC = recipe.cfg_channels || c;
  if (staticBatch && ((useCfg ? 2 * n : n) % staticBatch)) {
    throw new SamplerError(`this transformer graph has a fixed batch of ${staticBatch}`);
  }
  const modelFn = async (x, t) => {
    const batch = useCfg ? 2 * n : n;
    const hs = new Float32Array(batch * per);
    hs.set(x, 0);
    if (useCfg) hs.set(x, n * per);
    const ys = new BigInt64Array(batch);
    for (let i = 0; i < batch; i++) ys[i] = BigInt(conditional ? (i < n ? labels[i] : nul) : 0);
    const ts = new Float32Array(batch).fill(t);
    const out = await runGraph({ hidden_states: hs, timestep: ts, class_labels: ys, batch });
    for (let i = 0; i < out.length; i++) {
      if (!Number.isFinite(out[i])) throw new SamplerError(`the transformer returned NaN/Inf at timestep ${t}`);
    }
    if (!useCfg) return out;
    const outC = out.length / (batch * h * w), hw = h * w;
    const g = new Float32Array(n * outC * hw);
    for (let b = 0; b < n; b++) {
      for (let ch = 0; ch < outC; ch++) {
        const co = ((b * outC) + ch) * hw, uo = (((n + b) * outC) + ch) * hw;
        for (let j = 0; j < hw; j++) {
          g[co + j] = ch < cfgC ? out[uo + j] + cfgScale * (out[co + j] - out[uo + j]) : out[co + j];
        }
      }
    }
    return g;
  };
  let x;
  if (latents) {
    if (latents.length !== n * per) throw new SamplerError(`initial latents must hold ${n}x${c}x${h}x${w} values`);
    x = Float32Array.from(latents);
  } else x = initialNoise(n * per, seed);
  return run(recipe, modelFn, x, steps, { n, c, h, w }, stepNoise(seed), onStep);
}

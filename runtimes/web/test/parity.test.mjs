// Node tier: the browser's JavaScript (noise, samplers, onnxruntime-web graphs) against numbers
// written by Python (tests/test_web.py writes DCAE_WEB_FIXTURES and runs `node --test`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { portableNormals } from "../lib/noise.js";
import { generate, run } from "../lib/sampler.js";
import { loadBundle, openGraph } from "../lib/bundle.js";

const dir = process.env.DCAE_WEB_FIXTURES;
const fx = dir ? JSON.parse(readFileSync(join(dir, "fixtures.json"), "utf8")) : null;
const skip = fx ? false : "DCAE_WEB_FIXTURES not set (run through tests/test_web.py)";

function maxAbs(a, b) {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function psnr(ref, out) {
  let lo = Infinity, hi = -Infinity, se = 0;
  for (let i = 0; i < ref.length; i++) { lo = Math.min(lo, ref[i]); hi = Math.max(hi, ref[i]); se += (ref[i] - out[i]) ** 2; }
  return 10 * Math.log10(((hi - lo) ** 2) / (se / ref.length));
}

// the stand-in denoiser both languages implement (tests/test_web.py: toy_model)
function toy(x, t, n, c, hw, withVariance) {
  const out = new Float32Array(n * (withVariance ? 2 : 1) * c * hw);
  const per = c * hw;
  for (let b = 0; b < n; b++) {
    for (let j = 0; j < per; j++) {
      const v = x[b * per + j];
      const o = b * per * (withVariance ? 2 : 1);
      out[o + j] = 0.4 * v * Math.cos(t / 350) + 0.2 * Math.sin(t / 90) + 0.1 * Math.tanh(v);
      if (withVariance) out[o + per + j] = 0.8 * Math.tanh(v * Math.sin(t / 200));
    }
  }
  return out;
}

test("portable noise equals Python bit for bit", { skip }, () => {
  for (const c of fx.noise) {
    const got = portableNormals(c.seed, c.count, c.stream, c.offset);
    assert.deepEqual(Array.from(got), c.values.map((v) => Math.fround(v)), `seed ${c.seed} stream ${c.stream}`);
  }
});

test("every solver equals the numpy sampler on fixed noise", { skip }, async () => {
  for (const c of fx.sampler_cases) {
    const { n, c: ch, h, w } = c.dims;
    const model = async (x, t) => toy(x, t, n, ch, h * w, c.variance);
    const out = await run(c.recipe, model, Float32Array.from(c.noise), c.steps, c.dims,
      c.recipe.solver.name === "adm" ? (await import("../lib/noise.js")).stepNoise(c.seed) : null);
    const err = maxAbs(out, c.expected);
    const scale = Math.max(...c.expected.map(Math.abs));
    assert.ok(err <= 1e-4 + 1e-5 * scale, `${c.name}: max abs ${err} (values up to ${scale})`);
  }
});

test("onnxruntime-web runs the bundle's graphs like Python onnxruntime", { skip }, async () => {
  const bundle = await loadBundle(fx.bundle, { fetchFile: (p) => readFileSync(p) });
  for (const g of fx.graphs) {
    const session = await openGraph(bundle, g.graph, g.precision, { numThreads: 1 });
    const feeds = {};
    for (const [name, spec] of Object.entries(g.feeds)) {
      feeds[name] = { data: spec.dtype === "int64" ? BigInt64Array.from(spec.data.map(BigInt)) : Float32Array.from(spec.data),
        dims: spec.shape, type: spec.dtype };
    }
    const out = await session.run(feeds);
    if (g.precision === "fp32") {
      const err = maxAbs(out, g.expected);
      const scale = Math.max(...g.expected.map(Math.abs));
      assert.ok(err <= 1e-4 + 1e-5 * scale, `${g.graph} ${g.precision}: max abs ${err}`);
    } else if (g.precision === "fp16") {
      const db = psnr(g.expected, out);
      assert.ok(db >= 40, `${g.graph} ${g.precision}: ${db.toFixed(1)} dB`);
    } else { // int8: WASM's integer kernels round unlike x86 ones; as close to fp32 as native INT8 (its gate), and near it
      const native = psnr(g.fp32, g.expected), wasm = psnr(g.fp32, out), apart = psnr(g.expected, out);
      console.log(`${g.graph} int8: vs fp32 native ${native.toFixed(1)} dB, wasm ${wasm.toFixed(1)} dB; wasm vs native ${apart.toFixed(1)} dB`);
      assert.ok(wasm >= native - 1, `${g.graph} int8 in WASM: ${wasm.toFixed(1)} dB from fp32, native INT8 ${native.toFixed(1)} dB`);
      assert.ok(apart >= 35, `${g.graph} int8: WASM vs native ${apart.toFixed(1)} dB`);
    }
  }
});

test("a graph that returns NaN/Inf is an error, not a black image", { skip }, async () => {
  const bundle = await loadBundle(fx.bundle, { fetchFile: (p) => readFileSync(p) });
  const session = await openGraph(bundle, "vae_decoder", "fp32", { numThreads: 1 });
  const dims = bundle.manifest.graphs.vae_decoder.inputs[0].shape.map((d, i) => (typeof d === "number" ? d : i === 0 ? 1 : 2));
  const data = new Float32Array(dims.reduce((a, b) => a * b)).fill(0.5);
  data[3] = NaN;
  await assert.rejects(session.run({ latent_sample: { data, dims } }), /vae_decoder fp32 on wasm returned \d+ NaN\/Inf values/);
});

test("a whole generation in JavaScript equals the Python pipeline", { skip }, async () => {
  const bundle = await loadBundle(fx.bundle, { fetchFile: (p) => readFileSync(p) });
  const session = await openGraph(bundle, "transformer", "fp32", { numThreads: 1 });
  const g = fx.generation;
  const latents = await generate(bundle.manifest.sampler, (feeds) => session.run({
    hidden_states: { data: feeds.hidden_states, dims: [feeds.batch, ...bundle.manifest.sampler.latent_shape], type: "float32" },
    timestep: { data: feeds.timestep, dims: [feeds.batch], type: "float32" },
    class_labels: { data: feeds.class_labels, dims: [feeds.batch], type: "int64" },
  }), { labels: g.labels, steps: g.steps, cfgScale: g.cfg_scale, seed: g.seed });
  const err = maxAbs(latents, g.latents);
  assert.ok(err <= 1e-4 * Math.max(1, ...g.latents.map(Math.abs)), `latents: max abs ${err}`);
});

// precision "auto" in the browser: per graph, the fastest artifact that passed its check at export or
// calibration, timed in this browser on first use and remembered (localStorage) per bundle, backend and
// thread count. The same rule as runtimes/precision.py (gated, choose, AUTO_TIE); the probe is the
// browser's own, since WASM and WebGPU rank precisions unlike native runtimes do.

// timings closer than this are a tie, which goes to the more accurate artifact (runtimes/precision.py AUTO_TIE)
export const AUTO_TIE = 0.05;
export const ACCURACY_ORDER = ["fp32", "fp16", "int8"];

// What each onnxruntime-web backend is worth probing, and why the others are not. WASM has no fp16
// arithmetic: an fp16 graph computes in fp32 kernels after casts (bundled f64 decoder at 512², Chromium,
// 2 threads: fp16 582–633 vs fp32 584–592 ms), so only its download is smaller. WebGPU runs fp16 natively
// where the adapter has shader-f16; it has no QuantizeLinear kernel (onnxruntime-web 1.30,
// docs/webgpu-operators.md: DequantizeLinear only), so an INT8 QDQ graph would go back to WASM at every
// quantized op. (The WebGPU tier of tests/test_web.py runs on SwiftShader's CPU Vulkan: fp32 checked, no shader-f16.)
export const PROBED = { wasm: ["fp32", "int8"], webgpu: ["fp32", "fp16"] };
export const NOT_PROBED_WHY = {
  wasm: { fp16: "no fp16 arithmetic there" },
  webgpu: { int8: "no QuantizeLinear kernel there: each quantized op would go back to WASM" },
};
export const NO_SHADER_F16 = "this WebGPU adapter has no shader-f16: fp16 shaders cannot compile";

/** Precisions of one graph whose ONNX artifact exists and passed its check, in accuracy order. */
export function gated(manifest, graph) {
  const arts = ((manifest.graphs || {})[graph] || {}).artifacts || {};
  return ACCURACY_ORDER.filter((p) => {
    const art = arts[`onnx/${p}`];
    if (!art) return false;
    const v = art.validation || {};
    return "pass" in v ? v.pass === true : p === "fp32"; // fp32 without a recorded check is the export itself
  });
}

/** [precision, why]: the fastest allowed one, unless a more accurate one is level with it within AUTO_TIE. */
export function choose(timings, allowed) {
  const usable = Object.entries(timings).filter(([p, t]) => allowed.includes(p) && Number.isFinite(t) && t > 0);
  if (!usable.length) return ["fp32", "no gated artifact could be timed: fp32"];
  const [fastest, fastestMs] = usable.reduce((a, b) => (b[1] < a[1] ? b : a));
  const rank = (p) => (ACCURACY_ORDER.includes(p) ? ACCURACY_ORDER.indexOf(p) : ACCURACY_ORDER.length);
  const [best, bestMs] = usable.filter(([, t]) => t <= fastestMs * (1 + AUTO_TIE)).reduce((a, b) => (rank(b[0]) < rank(a[0]) ? b : a));
  const others = usable.filter(([p]) => p !== best).sort((a, b) => a[1] - b[1]).map(([p, t]) => `${p} ${t.toFixed(1)} ms`);
  let why = `${best} ${bestMs.toFixed(1)} ms` + (others.length ? ` (vs ${others.join(", ")})` : " (the only one timed)");
  if (best !== fastest) why += `; level with ${fastest} within ${AUTO_TIE * 100}%, and more accurate`;
  return [best, why];
}

/** A short stable key for remembered timings: the bundle's checksums, the backend, threads and this device
 * (on WebGPU, the adapter too: another GPU is timed again). */
export function cacheKey(manifest, backend, threads, device = "") {
  const text = JSON.stringify(manifest.files || {}) + `|${backend}|${threads}|${device}`;
  let h1 = 0x811c9dc5, h2 = 0x01000193; // two FNV-1a-style 32-bit hashes: collisions across bundles are not a concern
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 0x01000193) >>> 0;
    h2 = Math.imul(h2 ^ c, 0x5bd1e995) >>> 0;
  }
  return `dcae-edge/precision/${h1.toString(16).padStart(8, "0")}${h2.toString(16).padStart(8, "0")}`;
}

/** Timings a probe could have written ({precision: ms > 0}); anything else is dropped (and timed again). */
export function usableTimings(entry) {
  if (!entry || typeof entry !== "object" || Array.isArray(entry)) return {};
  const keep = {};
  for (const [p, v] of Object.entries(entry)) {
    if (typeof v === "number" && Number.isFinite(v) && v > 0) keep[p] = v;
  }
  return keep;
}

/**
 * [the gated precisions worth timing on this backend, [{precision, why}] the gated ones left out].
 * `device.shaderF16 === false` (a WebGPU adapter without the feature) leaves fp16 out too.
 */
export function candidates(manifest, graph, backend, device = {}) {
  const worth = PROBED[backend] || ["fp32"];
  const all = gated(manifest, graph);
  const why = (p) => (backend === "webgpu" && p === "fp16" && device.shaderF16 === false ? NO_SHADER_F16
    : (NOT_PROBED_WHY[backend] || {})[p] || `not probed on ${backend}`);
  const runs = (p) => worth.includes(p) && !(backend === "webgpu" && p === "fp16" && device.shaderF16 === false);
  return [all.filter(runs), all.filter((p) => !runs(p)).map((p) => ({ precision: p, why: why(p) }))];
}

/**
 * The precision auto runs one graph at: {precision, why, source: "only" | "timed" | "remembered", skipped}
 * (skipped: [{precision, why}]). `time(precision)` -> median ms (throws: that precision cannot run here);
 * `device` what the backend's hardware lacks ({shaderF16: false}); `storage` like localStorage
 * (getItem/setItem; null: nothing remembered). A remembered timing is reused; a candidate without one is timed
 * (`onTiming(precisions)` is told first: a probe takes seconds on a slow device).
 */
export async function resolveAuto(manifest, graph, backend, { time, storage = null, key = "", device = {}, onTiming = () => {} }) {
  const [allowed, skipped] = candidates(manifest, graph, backend, device);
  if (allowed.length <= 1) {
    const p = allowed[0] || "fp32";
    return { precision: p, why: `${p} (the only gated artifact worth timing on ${backend})`, source: "only", skipped };
  }
  let remembered = {};
  try { remembered = JSON.parse(storage?.getItem(key) ?? "{}"); } catch { remembered = {}; } // unreadable: time again
  if (!remembered || typeof remembered !== "object" || Array.isArray(remembered)) remembered = {};
  const timings = usableTimings(remembered[graph]);
  const missing = allowed.filter((p) => !(p in timings));
  if (missing.length) onTiming(missing);
  for (const p of missing) {
    try { timings[p] = await time(p); } catch { timings[p] = null; }
  }
  if (missing.length && storage) { // what could not run is not remembered: a failed download is retried next visit
    const ran = Object.fromEntries(Object.entries(timings).filter(([, t]) => t !== null));
    try { storage.setItem(key, JSON.stringify({ ...remembered, [graph]: ran })); }
    catch { /* storage full or disabled: time again next visit */ }
  }
  const [precision, why] = choose(timings, allowed);
  return { precision, why, source: missing.length ? "timed" : "remembered", skipped };
}

// The page: reads the bundle's manifest (and nothing else) to know graphs, shapes, precisions,
// the scaling factor, class names and the sampler recipe; runs onnxruntime-web (WASM, or WebGPU
// when the browser offers it); keeps working after any error, which it shows on the page.
// window.dcae exposes the same actions for scripted use (the browser tests drive it).
import * as ortWasm from "onnxruntime-web";
import { BundleError, describeBundle, fallingBackToFp32, GraphLoadError, loadBundle, openGraph } from "./lib/bundle.js";
import { cacheKey, NO_SHADER_F16, resolveAuto } from "./lib/precision.js";
import { generate, SamplerError } from "./lib/sampler.js";

const $ = (id) => document.getElementById(id);
const state = { bundle: null, info: null, sessions: new Map(), auto: new Map(), ort: ortWasm, backend: "wasm", busy: false,
  gpu: {}, // the WebGPU adapter in use: {name, shaderF16, fallback}
  backendAuto: false, // the backend was chosen by "auto" (which falls back to WASM when WebGPU fails: guarded)
  gpuLost: null }; // why onnxruntime-web's WebGPU device was lost ("destroyed: ..."): its sessions cannot run again

function say(text, kind = "info") {
  const div = document.createElement("div");
  div.className = kind;
  div.textContent = text;
  $("messages").prepend(div);
  while ($("messages").children.length > 8) $("messages").lastChild.remove();
  return div;
}

function threads() { // threads need cross-origin isolation (COOP/COEP headers from python -m runtimes.web)
  const asked = Number(new URLSearchParams(location.search).get("threads"));  // ?threads=N (benchmarks)
  const cores = navigator.hardwareConcurrency || 1;
  if (!crossOriginIsolated) return 1;
  return asked > 0 ? asked : Math.max(1, Math.min(4, cores));
}

async function session(graph, asked = $("precision").value || "auto") {
  const precision = asked === "auto" ? await autoPrecision(graph) : asked;
  const have = state.info.precisions[graph];
  const use = have.includes(precision) ? precision : "fp32";
  if (state.backend === "webgpu" && use === "fp16" && state.gpu.shaderF16 === false) { // say so, not the shader compiler
    throw new BundleError(`${graph} fp16: ${NO_SHADER_F16}; choose fp32 or auto, or the WASM backend`);
  }
  const key = `${graph}/${use}/${state.backend}`;
  if (!state.sessions.has(key)) {
    if (use !== precision) say(`${graph} has no ${precision} artifact; using fp32`, "warn");
    state.sessions.set(key, await openGraph(state.bundle, graph, use, { ort: state.ort, executionProviders: [state.backend] }));
    if (state.backend === "webgpu") watchDevice();
  }
  if (asked !== "auto") return state.sessions.get(key);
  return fallingBackToFp32(state.sessions.get(key), use, () => { // auto: an overflow on this input moves the graph to fp32
    state.auto.set(`${graph}/${state.backend}`, "fp32");
    return session(graph, "fp32");
  }, () => say(`precision auto: ${graph} at ${use} returned NaN/Inf on this input (an overflow at ${use}): ` +
    "it runs at fp32 from now on", "warn"));
}

function storage() { // localStorage, or null where the browser refuses it (private modes, sandboxed frames)
  try { return window.localStorage; } catch { return null; }
}

async function autoPrecision(graph) { // once per graph and backend: remembered, or timed here on first use
  const k = `${graph}/${state.backend}`;
  if (!state.auto.has(k)) {
    const n = state.ort.env.wasm.numThreads;
    let timing = null; // the "timing ..." notice, replaced by the choice
    const key = cacheKey(state.bundle.manifest, state.backend, n,
      `${navigator.userAgent}|${navigator.hardwareConcurrency}|${state.backend === "webgpu" ? state.gpu.name : ""}`);
    const res = await resolveAuto(state.bundle.manifest, graph, state.backend, { key, storage: storage(), device: state.gpu,
      time: async (p) => {
        try { return await timeSession(await session(graph, p), probeFeeds(graph), 3); }
        catch (e) { say(`precision auto: ${graph} ${p} cannot run here, left out: ${e.message || e}`, "error"); throw e; }
      },
      onTiming: (ps) => { timing = say(`precision auto: timing ${graph} at ${ps.join(" and ")} once on this device…`); } });
    timing?.remove();
    for (const p of state.info.precisions[graph]) { // the candidates not chosen: their memory back
      const other = `${graph}/${p}/${state.backend}`;
      if (p !== res.precision && state.sessions.has(other)) {
        await state.sessions.get(other).session.release?.();
        state.sessions.delete(other);
      }
    }
    const source = { timed: "timed in this browser; ", remembered: "remembered from an earlier visit; ", only: "" }[res.source];
    const where = state.backend === "webgpu" ? `webgpu (${state.gpu.name})` : `${state.backend}, ${n} thread${n === 1 ? "" : "s"}`;
    say(`precision auto: ${graph} → ${res.why}; ${source}${where}` +
      res.skipped.map((s) => `; ${s.precision} not timed on ${state.backend} (${s.why})`).join(""));
    state.auto.set(k, res.precision);
  }
  return state.auto.get(k);
}

// ------------------------------------------------------------------------------------------ images
function toTensor(imageData) { // RGBA uint8 -> float32 CHW in [-1, 1] (like runtimes.images.as_model_input)
  const { width: w, height: h, data } = imageData;
  const x = new Float32Array(3 * w * h);
  for (let i = 0; i < w * h; i++) for (let c = 0; c < 3; c++) x[c * w * h + i] = data[4 * i + c] / 127.5 - 1;
  return x;
}

function toPixels(x, w, h) { // float CHW -> RGB uint8 (round, clip: runtimes.images.to_uint8)
  const out = new Uint8ClampedArray(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    for (let c = 0; c < 3; c++) out[4 * i + c] = Math.min(255, Math.max(0, Math.round((x[c * w * h + i] + 1) * 127.5)));
    out[4 * i + 3] = 255;
  }
  return new ImageData(out, w, h);
}

function draw(canvas, imageData) {
  canvas.width = imageData.width;
  canvas.height = imageData.height;
  canvas.getContext("2d").putImageData(imageData, 0, 0);
}

async function imageFrom(blobOrUrl) {
  const blob = typeof blobOrUrl === "string" ? await (await fetch(blobOrUrl)).blob() : blobOrUrl;
  try { return await createImageBitmap(blob); }
  catch { throw new BundleError(`this file is not an image the browser can decode (${blob.type || "unknown type"})`); }
}

function cropToSquare(bitmap, size) { // centre square, resized to the bundle resolution
  const side = Math.min(bitmap.width, bitmap.height);
  const canvas = new OffscreenCanvas(size, size);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, size, size);
  return ctx.getImageData(0, 0, size, size);
}

function psnr(a, b) { // uint8 RGBA, alpha ignored
  let se = 0, n = 0;
  for (let i = 0; i < a.data.length; i++) { if (i % 4 === 3) continue; se += (a.data[i] - b.data[i]) ** 2; n++; }
  return 10 * Math.log10((255 * 255) / (se / n));
}

// ------------------------------------------------------------------------------------------ actions
async function reconstruct(source) {
  if (!state.info.canReconstruct) throw new BundleError(state.info.whyNoReconstruct);
  const r = state.info.resolution, f = state.info.compression, c = state.info.latentChannels;
  const original = cropToSquare(await imageFrom(source), r);
  draw($("original"), original);
  const enc = await session("vae_encoder"); // loaded (and auto's first-use timing done) before the clock starts
  const dec = await session("vae_decoder");
  const t0 = performance.now();
  const latents = await enc.run({ sample: { data: toTensor(original), dims: [1, 3, r, r] } });
  const t1 = performance.now();
  const image = await dec.run({ latent_sample: { data: latents, dims: [1, c, r / f, r / f] } });
  const t2 = performance.now();
  const out = toPixels(image, r, r);
  draw($("reconstruction"), out);
  const result = { psnr: psnr(original, out), latentShape: [c, r / f, r / f], encodeMs: t1 - t0, decodeMs: t2 - t1,
    pixels: Array.from(out.data), originalPixels: Array.from(original.data) };
  $("reconstruct-stats").textContent = `${r}×${r}×3 = ${(3 * r * r).toLocaleString()} numbers → latent ${c}×${r / f}×${r / f} = ` +
    `${(c * (r / f) ** 2).toLocaleString()} numbers (${(3 * r * r / (c * (r / f) ** 2)).toFixed(0)}× fewer). ` +
    `PSNR ${result.psnr.toFixed(2)} dB · encode ${result.encodeMs.toFixed(0)} ms · decode ${result.decodeMs.toFixed(0)} ms`;
  return result;
}

function classIds(text) {
  const names = state.info.classNames;
  const k = state.bundle.manifest.denoiser.config.num_classes;
  return text.split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
    if (/^\d+$/.test(s)) {
      const id = Number(s);
      if (id >= k) throw new SamplerError(`class id ${id} is out of range: this model has classes 0..${k - 1}`);
      return id;
    }
    const hits = names.map((n, i) => [n.toLowerCase(), i]).filter(([n]) => n === s.toLowerCase() || n.includes(s.toLowerCase()));
    if (hits.length !== 1) throw new SamplerError(hits.length ? `'${s}' matches ${hits.length} classes; use the id` : `no class is called '${s}'`);
    return hits[0][1];
  });
}

async function generateImages({ classes, steps, cfg, seed }) {
  if (!state.info.canGenerate) throw new BundleError(state.info.whyNoGenerate);
  const recipe = state.info.sampler;
  const labels = state.bundle.manifest.denoiser.config.num_classes > 0 ? classIds(String(classes)) : null;
  const tr = await session("transformer");
  const dec = await session("vae_decoder");
  const [c, h, w] = recipe.latent_shape;
  const stepTimes = [];
  let last = performance.now();
  $("progress").value = 0;
  const latents = await generate(recipe, (feeds) => tr.run({
    hidden_states: { data: feeds.hidden_states, dims: [feeds.batch, c, h, w] },
    timestep: { data: feeds.timestep, dims: [feeds.batch] },
    class_labels: { data: feeds.class_labels, dims: [feeds.batch], type: "int64" },
  }), {
    labels, n: labels ? labels.length : 1, steps, cfgScale: cfg, seed,
    onStep: (done, total) => {
      const now = performance.now();
      stepTimes.push(now - last);
      last = now;
      $("progress").value = done / total;
      const where = total === 1 ? `${(100 * done).toFixed(0)}% of the ODE` : `step ${done} / ${total}`;
      $("step-info").textContent = `${where} · ${stepTimes.at(-1).toFixed(0)} ms`;
    },
  });
  const n = labels ? labels.length : 1, r = state.info.resolution, per = c * h * w;
  const sf = recipe.latent_scaling_factor;
  $("gallery").replaceChildren();
  const images = [];
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const z = latents.slice(i * per, (i + 1) * per).map((v) => v / sf);
    const img = toPixels(await dec.run({ latent_sample: { data: z, dims: [1, c, h, w] } }), r, r);
    const canvas = document.createElement("canvas");
    draw(canvas, img);
    canvas.title = labels ? (state.info.classNames[labels[i]] ?? String(labels[i])) : `sample ${i}`;
    $("gallery").append(canvas);
    images.push(Array.from(img.data));
  }
  const decodeMs = performance.now() - t0;
  const mean = stepTimes.reduce((a, b) => a + b, 0) / Math.max(1, stepTimes.length);
  $("generate-stats").textContent = `${n} image(s): ${stepTimes.length} sampler steps, ${mean.toFixed(0)} ms per step · decode ${decodeMs.toFixed(0)} ms`;
  return { images, labels, stepMs: stepTimes, decodeMs, latents: Array.from(latents) };
}

// A GPU device can be lost at any time (a driver reset, another tab, the OS reclaiming it on a phone). onnxruntime-web
// cannot replace its device, so its WebGPU sessions are dead until the page is reloaded: auto moves to WASM.
let watched = null;
function watchDevice() {
  const device = state.ort.env.webgpu?.device;
  if (!device || device === watched) return;
  watched = device;
  device.lost.then((info) => deviceLost(`${info.reason}: ${info.message || "no message"}`).catch(() => {}));
}

async function deviceLost(why) { // from device.lost, or from a run that failed on it (whichever comes first)
  if (state.gpuLost || state.backend !== "webgpu") { state.gpuLost ||= why; return; }
  state.gpuLost = why;
  if (state.backendAuto) {
    say(`backend auto: the WebGPU device on ${state.gpu.name} was lost (${why}): running on WASM from now on`, "warn");
    await useBackend("wasm", true);
  } else if (!state.busy) { // (during an action, the action's error says it)
    say(`the WebGPU device was lost (${why}): ${RELOAD}`, "error");
  }
}

const LOST = /device (was|is) lost/i;
const RELOAD = "reload the page to use WebGPU again, or choose WASM";

async function guarded(fn) { // one action at a time; any error becomes a message, the page keeps working
  if (state.busy) { say("busy: wait for the current action to finish", "warn"); return null; }
  state.busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    const onGpu = state.backend === "webgpu", auto = state.backendAuto;
    try { return await fn(); }
    catch (e) { // auto's WebGPU failed (its device lost, or a graph it cannot load): the action runs again on WASM
      if (onGpu && (state.gpuLost || LOST.test(String(e?.message)))) {
        await deviceLost(state.gpuLost || "lost during a run");
        if (!auto) throw new BundleError(`the WebGPU device was lost (${state.gpuLost}): ${RELOAD}`);
      } else if (onGpu && auto && e instanceof GraphLoadError && state.backend === "webgpu") {
        say(`backend auto: WebGPU on ${state.gpu.name} could not load ${e.graph} (${e.message}): running on WASM from now on`, "warn");
        await useBackend("wasm", true);
      } else {
        throw e; // (an explicitly chosen WebGPU shows its error)
      }
      return await fn();
    }
  }
  catch (e) {
    say(e instanceof BundleError || e instanceof SamplerError ? e.message : `error: ${e.message || e}`, "error");
    throw e;
  }
  finally {
    state.busy = false;
    document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    if (state.info && !state.info.canGenerate) $("generate").disabled = true;
  }
}

function describeAdapter(adapter) {
  const info = adapter.info || {};
  return { name: [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unknown adapter",
    shaderF16: adapter.features.has("shader-f16"), fallback: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter) };
}

// "auto" (the default): WebGPU where the browser offers a hardware adapter, else WASM. A software fallback
// adapter (SwiftShader: Vulkan on the CPU) is slower than WASM by an order of magnitude, so it is not taken.
async function setBackend(name) {
  const auto = name === "auto";
  const adapter = name === "wasm" || !("gpu" in navigator) ? null : await navigator.gpu.requestAdapter().catch(() => null);
  const gpu = adapter ? describeAdapter(adapter) : null;
  if (name === "auto") {
    name = gpu && !gpu.fallback && !state.gpuLost ? "webgpu" : "wasm";
    say(`backend auto: ${name === "webgpu" ? `WebGPU on ${gpu.name}` : `WASM (${state.gpuLost
      ? "the WebGPU device was lost in this page: reload it to use WebGPU again"
      : gpu ? `the WebGPU adapter, ${gpu.name}, is a software fallback` : "this browser offers no WebGPU adapter"})`}`);
  } else if (name === "webgpu" && state.gpuLost) {
    $("backend").value = "wasm";
    say(`WebGPU was asked for but its device was lost in this page (${state.gpuLost}): reload the page to use it ` +
      "again; running on WASM", "warn");
    name = "wasm";
  } else if (name === "webgpu" && !gpu) {
    $("backend").value = "wasm";
    say("WebGPU was asked for but this browser offers no WebGPU adapter: running on WASM", "warn");
    name = "wasm";
  }
  if (name === "webgpu") state.gpu = gpu;
  await useBackend(name, auto);
}

async function useBackend(name, auto) {
  // on WebGPU, onnxruntime-web asks for the default adapter too (same options): the one whose features were read
  state.ort = name === "webgpu" ? await import("onnxruntime-web/webgpu") : ortWasm;
  state.backendAuto = auto;
  state.ort.env.wasm.numThreads = threads();
  state.ort.env.wasm.wasmPaths = new URL("./vendor/ort/", location.href).href;
  state.backend = name;
  state.sessions.clear();
  state.auto.clear();
  $("threads").textContent = `${name.toUpperCase()} · ` + (name === "webgpu"
    ? `${state.gpu.name}${state.gpu.fallback ? " (a software fallback adapter)" : ""}${state.gpu.shaderF16 ? "" : ", no shader-f16"}`
    : crossOriginIsolated ? `cross-origin isolated, ${state.ort.env.wasm.numThreads} threads` : "not isolated: 1 thread");
}

async function init() {
  await setBackend($("backend").value || "auto");
  try {
    state.bundle = await loadBundle(new URL("./bundle/", location.href).href);
  } catch (e) {
    $("bundle-info").textContent = "No usable bundle.";
    say(e.message, "error");
    document.querySelectorAll("button, input, select").forEach((el) => { el.disabled = true; });
    return;
  }
  const info = state.info = describeBundle(state.bundle);
  const m = state.bundle.manifest;
  $("bundle-info").textContent = `${m.autoencoder.name} at ${info.resolution}px, latent ${info.latentChannels}×` +
    `${info.resolution / info.compression}×${info.resolution / info.compression}; graphs: ${Object.keys(m.graphs).join(", ")}` +
    (m.denoiser ? `; denoiser ${m.denoiser.name}` : "");
  const all = ["auto", ...new Set(Object.values(info.precisions).flat())];
  $("precision").replaceChildren(...all.map((p) => new Option(p, p, p === "auto", p === "auto")));
  for (const name of ["astronaut", "coffee", "chelsea", "rocket"]) {
    const b = document.createElement("button");
    b.textContent = name;
    b.onclick = () => guarded(() => reconstruct(`samples/${name}.jpg`)).catch(() => {});
    $("sample-buttons").append(b);
  }
  $("file").onchange = (ev) => ev.target.files[0] && guarded(() => reconstruct(ev.target.files[0])).catch(() => {});
  const drop = $("drop");
  drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const file = ev.dataTransfer.files[0];
    if (file) guarded(() => reconstruct(file)).catch(() => {});
  };
  if (!info.canReconstruct) { say(info.whyNoReconstruct + ": reconstruct is disabled", "warn"); }
  if (info.canGenerate) {
    const rec = info.sampler;
    $("steps").value = rec.steps ?? 30;
    $("cfg").value = rec.cfg_scale ?? 1;
    const k = m.denoiser.config.num_classes;
    $("classes").value = k === 0 ? "" : k <= 16 ? [...Array(k).keys()].join(", ") : "207, 360, 387, 974";
    $("classes").disabled = k === 0;
    $("generate-why").textContent = `${m.denoiser.name}: ${rec.kind === "flow" ? "flow matching" : "eps prediction"}, ` +
      `${rec.solver.name}; classes ${k <= 16 ? info.classNames.join(" ") : `0..${k - 1} (ids or names)`}`;
  } else {
    $("generate").disabled = true;
    $("generate-why").textContent = info.whyNoGenerate;
    say(`generate is disabled: ${info.whyNoGenerate}`, "warn");
  }
  $("generate").onclick = () => guarded(() => generateImages({ classes: $("classes").value, steps: Number($("steps").value),
    cfg: Number($("cfg").value), seed: Number($("seed").value) })).catch(() => {});
  $("backend").onchange = () => setBackend($("backend").value).catch((e) => say(e.message, "error"));
  $("precision").onchange = () => { state.sessions.clear(); state.auto.clear(); };
}

function probeFeeds(graph) { // inputs of the bundle's shapes (random values: timing only)
  const m = state.bundle.manifest, r = state.info.resolution, f = state.info.compression, c = state.info.latentChannels;
  const rand = (n) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
  if (graph === "vae_encoder") return { sample: { data: rand(3 * r * r), dims: [1, 3, r, r] } };
  if (graph === "vae_decoder") return { latent_sample: { data: rand(c * (r / f) ** 2), dims: [1, c, r / f, r / f] } };
  const [lc, h, w] = state.info.sampler.latent_shape;
  return { hidden_states: { data: rand(2 * lc * h * w), dims: [2, lc, h, w] },
    timestep: { data: new Float32Array([500, 500]), dims: [2] },
    class_labels: { data: new BigInt64Array([0n, BigInt(m.denoiser.config.num_classes)]), dims: [2], type: "int64" } };
}

async function timeSession(s, feeds, runs) { // median ms after one warm-up run
  await s.run(feeds);
  const times = [];
  for (let i = 0; i < runs; i++) { const t = performance.now(); await s.run(feeds); times.push(performance.now() - t); }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

// median ms of one graph at the bundle resolution; precision: the page's choice unless given
async function bench(graph, runs = 5, precision = undefined) {
  return timeSession(await session(graph, precision), probeFeeds(graph), runs);
}

const ready = init();
window.dcae = {
  ready, state,
  reconstruct: (url) => guarded(() => reconstruct(url)),
  generate: (opts) => guarded(() => generateImages(opts)),
  setBackend, bench, precisionOf: (graph) => state.auto.get(`${graph}/${state.backend}`), messages: () => Array.from($("messages").children, (d) => d.textContent),
};

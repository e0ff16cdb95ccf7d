// A dcae-edge bundle read through its manifest.json only: graphs, shapes, artifacts and their
// checksums, scaling factor, class names, the sampler recipe. Works in the browser (files are
// URLs) and in Node (files are paths; fetchFile reads them), with onnxruntime-web in both.

export class BundleError extends Error {}
// onnxruntime-web could not create a session of `graph` (the execution provider failed, not the bundle's files)
export class GraphLoadError extends BundleError {
  constructor(message, graph) { super(message); this.graph = graph; }
}
// a graph returned NaN/Inf: an overflow at a reduced precision (fp16 on a GPU), or a NaN input
export class NonFiniteOutput extends BundleError {}

const SUPPORTED_MANIFEST_VERSION = 1;
const TWO_GB = 2 * 1024 ** 3;

async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function defaultFetch(url) {
  const res = await fetch(url);
  if (!res.ok) {
    let detail = "";
    try { detail = (await res.json()).error; } catch { /* not a JSON error body */ }
    throw new BundleError(detail || `${url}: HTTP ${res.status} ${res.statusText}`);
  }
  return new Uint8Array(await res.arrayBuffer());
}

function join(base, rel) {
  return base.endsWith("/") ? base + rel : `${base}/${rel}`;
}

/** Read and check manifest.json. `fetchFile(pathOrUrl) -> bytes` (default: fetch). */
export async function loadBundle(base, { fetchFile = defaultFetch, verify = true } = {}) {
  let raw;
  try { raw = await fetchFile(join(base, "manifest.json")); }
  catch (e) { throw new BundleError(`${base} has no readable manifest.json (${e.message}); export a bundle with python -m export.onnx`); }
  let manifest;
  try { manifest = JSON.parse(new TextDecoder().decode(raw)); }
  catch (e) { throw new BundleError(`${base}/manifest.json is corrupt (${e.message}); export the bundle again`); }
  if (manifest.format !== "dcae-edge-bundle") throw new BundleError(`${base}/manifest.json is not a dcae-edge bundle manifest`);
  if ((manifest.manifest_version || 0) > SUPPORTED_MANIFEST_VERSION) {
    throw new BundleError(`the bundle was written by a newer dcae-edge (manifest v${manifest.manifest_version}); update the app`);
  }
  const files = manifest.files || {};
  return {
    base, manifest, verify,
    /** bytes of a bundle file, checked against the manifest (size, then sha256) */
    async file(rel) {
      const meta = files[rel];
      if (!meta) throw new BundleError(`${rel} is not listed in the manifest; the bundle was modified after export`);
      if (meta.bytes > TWO_GB && rel.endsWith(".onnx")) {
        throw new BundleError(`${rel} is ${(meta.bytes / 1e9).toFixed(2)} GB: over the 2 GB protobuf limit of onnxruntime-web; ` +
          "export fp16 or int8, or use external data (python -m export.onnx ... --fp16)");
      }
      const bytes = await fetchFile(join(base, rel));
      if (bytes.length !== meta.bytes) {
        throw new BundleError(`${rel} is truncated or altered (${bytes.length} bytes, the manifest says ${meta.bytes}); copy the bundle again`);
      }
      if (verify && (await sha256Hex(bytes)) !== meta.sha256) {
        throw new BundleError(`${rel} does not match its checksum in the manifest (corrupt or tampered); copy the bundle again`);
      }
      return bytes;
    },
  };
}

/** Which graphs, precisions and features the bundle offers (for the page's pickers). */
export function describeBundle(bundle) {
  const m = bundle.manifest;
  const graphs = m.graphs || {};
  const precisions = (g) => Object.keys((graphs[g] || {}).artifacts || {}).filter((k) => k.startsWith("onnx/"))
    .map((k) => k.slice(5));
  const dn = m.denoiser || null;
  return {
    resolution: m.resolution, dynamic: m.dynamic !== false, latentChannels: m.autoencoder.config.latent_channels,
    compression: m.autoencoder.spatial_compression, scalingFactor: m.autoencoder.scaling_factor,
    canReconstruct: "vae_encoder" in graphs && "vae_decoder" in graphs,
    canGenerate: "transformer" in graphs && "vae_decoder" in graphs && !!dn,
    whyNoGenerate: !("transformer" in graphs) || !dn ? "this bundle has no denoiser (transformer graph): export one with python -m export.onnx --denoiser FILE"
      : !("vae_decoder" in graphs) ? "this bundle has no vae_decoder graph to turn latents into pixels" : null,
    whyNoReconstruct: !("vae_encoder" in graphs) ? "this bundle has no vae_encoder graph" : !("vae_decoder" in graphs) ? "this bundle has no vae_decoder graph" : null,
    classNames: dn ? dn.class_names || [] : [],
    precisions: { vae_encoder: precisions("vae_encoder"), vae_decoder: precisions("vae_decoder"), transformer: precisions("transformer") },
    sampler: m.sampler || null,
  };
}

/**
 * An onnxruntime-web session for one graph at one precision ("fp32" | "fp16" | "int8").
 * Returns {run(feeds) -> Float32Array of the first output, inputNames, provider}.
 * feeds: {name: {data, dims, type}}.
 */
export async function openGraph(bundle, graph, precision = "fp32", { ort = null, numThreads = 0, executionProviders = ["wasm"] } = {}) {
  ort = ort || (await import("onnxruntime-web"));
  const g = (bundle.manifest.graphs || {})[graph];
  if (!g) throw new BundleError(`this bundle has no ${graph} graph (it holds ${Object.keys(bundle.manifest.graphs || {}).join(", ")})`);
  const key = `onnx/${precision}`;
  const art = g.artifacts[key];
  if (!art) {
    throw new BundleError(`${graph}: no ${precision} ONNX artifact (available: ${Object.keys(g.artifacts).filter((k) => k.startsWith("onnx/")).join(", ")})`);
  }
  if (numThreads) ort.env.wasm.numThreads = numThreads;
  const model = await bundle.file(art.files[0]);
  const external = [];
  for (const rel of art.files.slice(1)) {
    if (rel.endsWith(".data")) external.push({ path: rel.split("/").pop(), data: await bundle.file(rel) });
  }
  let session;
  try {
    session = await ort.InferenceSession.create(model, { executionProviders, ...(external.length ? { externalData: external } : {}) });
  } catch (e) {
    const detail = String(e.message || e).split("\n")[0];
    throw new GraphLoadError(`${graph} ${precision}: onnxruntime-web cannot load it (${/^\d+$/.test(detail)
      ? `an error inside its WebAssembly, with no message: code ${detail}` : detail})`, graph); // a bare number: a C++ exception
  }
  const out = session.outputNames[0];
  return {
    inputNames: session.inputNames, provider: executionProviders[0], session,
    async run(feeds) {
      const tensors = {};
      for (const name of session.inputNames) {
        const f = feeds[name];
        if (!f) throw new BundleError(`${graph}: missing input ${name}`);
        tensors[name] = new ort.Tensor(f.type || "float32", f.data, f.dims);
      }
      const data = (await session.run(tensors))[out].data;
      let bad = 0; // an overflow (fp16 on a GPU) or a NaN input: never a silently black image
      for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i])) bad++;
      if (bad) throw new NonFiniteOutput(`${graph} ${precision} on ${executionProviders[0]} returned ${bad} NaN/Inf values` +
        " (a NaN input, or an overflow at this precision: try fp32)");
      return data;
    },
  };
}

/**
 * `graph` (opened at a reduced `precision` by precision auto) whose output overflows runs that call again at fp32,
 * and every later call: `openFp32()` opens it, `onFallback(error)` is told once. An fp32 graph is returned as is.
 * (An overflow depends on the input: fp16's check at export saw a few photos, a GPU sees whatever the user drops.)
 */
export function fallingBackToFp32(graph, precision, openFp32, onFallback = () => {}) {
  if (precision === "fp32") return graph;
  let current = graph;
  return {
    ...graph,
    async run(feeds) {
      try { return await current.run(feeds); }
      catch (e) {
        if (current !== graph || !(e instanceof NonFiniteOutput)) throw e;
        current = await openFp32();
        onFallback(e);
        return current.run(feeds);
      }
    },
  };
}

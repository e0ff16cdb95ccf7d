// Benchmark: median ms of the encoder, the decoder and one transformer step (CFG batch 2) at every ONNX
// precision the bundle has, in headless Chromium, WASM with 1 and 2 threads. Prints one JSON line:
// {threads: {threads, graphs: {graph: {precision: ms}}}}.
import { openPage } from "./browser.mjs";

const [url, runs] = process.argv.slice(2);
const out = {};
for (const threads of [1, 2]) {
  const { browser, page } = await openPage(`${url}?threads=${threads}`);
  try {
    out[threads] = await page.evaluate(async (n) => {
      const { state } = window.dcae;
      const graphs = {};
      for (const graph of ["vae_decoder", "vae_encoder", "transformer"]) {
        if (!(graph in state.bundle.manifest.graphs) || (graph === "transformer" && !state.info.canGenerate)) continue;
        graphs[graph] = {};
        for (const precision of state.info.precisions[graph]) {
          graphs[graph][precision] = await window.dcae.bench(graph, graph === "transformer" ? n * 4 : n, precision);
          state.sessions.clear(); // one session at a time: the numbers of one are not the memory pressure of three
        }
      }
      return { threads: state.ort.env.wasm.numThreads, graphs };
    }, Number(runs || 5));
  } finally {
    await browser.close();
  }
}
console.log(JSON.stringify(out));

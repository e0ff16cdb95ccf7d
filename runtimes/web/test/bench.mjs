// Benchmark: median ms of the decoder and one transformer step (CFG batch 2) in headless
// Chromium, WASM with the thread count given in the URL. Prints one JSON line.
import { openPage } from "./browser.mjs";

const [url, runs] = process.argv.slice(2);
const out = {};
for (const threads of [1, 2]) {
  const { browser, page } = await openPage(`${url}?threads=${threads}`);
  try {
    out[threads] = await page.evaluate(async (n) => ({
      threads: window.dcae.state.ort.env.wasm.numThreads,
      vae_decoder: await window.dcae.bench("vae_decoder", n),
      vae_encoder: await window.dcae.bench("vae_encoder", n),
      transformer: window.dcae.state.info.canGenerate ? await window.dcae.bench("transformer", n * 4) : null,
    }), Number(runs || 5));
  } finally {
    await browser.close();
  }
}
console.log(JSON.stringify(out));

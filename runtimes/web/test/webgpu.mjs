// WebGPU tier: the page on onnxruntime-web's WebGPU backend, SwiftShader as the adapter. Reconstructs the
// PNG and generates at fp32 (pixels compared in Python), asks for fp16 on an adapter without shader-f16,
// and lets auto choose. Prints one JSON line; {adapter: null} when this Chromium offers no adapter.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { openPage } from "./browser.mjs";

const [url, out] = process.argv.slice(2);
const { browser, page, logs } = await openPage(url, { webgpu: true });
try {
  const adapter = await page.evaluate(async () => {
    const a = "gpu" in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    return a ? { vendor: a.info?.vendor, architecture: a.info?.architecture, shaderF16: a.features.has("shader-f16") } : null;
  });
  if (!adapter) {
    console.log(JSON.stringify({ adapter: null, logs }));
  } else {
    const png = readFileSync(join(out, "photo.png")).toString("base64");
    const r = await page.evaluate(async (b64) => {
      const pick = (p) => {
        document.querySelector("#precision").value = p;
        document.querySelector("#precision").dispatchEvent(new Event("change"));
      };
      const res = { autoBackend: window.dcae.state.backend, autoSaid: window.dcae.messages().filter((m) => m.startsWith("backend auto")) };
      document.querySelector("#backend").value = "webgpu";
      await window.dcae.setBackend("webgpu");
      Object.assign(res, { backend: window.dcae.state.backend, label: document.querySelector("#threads").textContent });
      pick("fp32");
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      res.reconstruct = (await window.dcae.reconstruct(new Blob([bytes], { type: "image/png" }))).pixels;
      res.generate = (await window.dcae.generate({ classes: "0, 2", steps: 6, cfg: 2, seed: 3 })).images;
      pick("fp16");
      try { await window.dcae.reconstruct("samples/coffee.jpg"); res.fp16 = "ran"; } catch (e) { res.fp16 = e.message; }
      pick("auto");
      await window.dcae.reconstruct("samples/coffee.jpg");
      res.chosen = { vae_encoder: window.dcae.precisionOf("vae_encoder"), vae_decoder: window.dcae.precisionOf("vae_decoder") };
      res.messages = window.dcae.messages();
      return res;
    }, png);
    console.log(JSON.stringify({ adapter, ...r, logs: logs.filter((l) => !l.includes("VerifyEachNodeIsAssignedToAnEp")) }));
  }
} finally {
  await browser.close();
}

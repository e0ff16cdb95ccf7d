// WebGPU tier: the page on onnxruntime-web's WebGPU backend, SwiftShader as the adapter. Reconstructs the
// PNG and generates at fp32 (pixels compared in Python), asks for fp16 on an adapter without shader-f16,
// and lets auto choose. Then backend auto's two branches a CPU machine never takes, on SwiftShader made to report
// itself as a hardware adapter: auto takes WebGPU; when WebGPU cannot load a graph (the adapter refuses a device), or
// its device is lost, auto falls back to WASM and says so. Prints one JSON line; {adapter: null} when this Chromium offers no adapter.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { openPage } from "./browser.mjs";

const [url, out] = process.argv.slice(2);
const png = readFileSync(join(out, "photo.png")).toString("base64");

const asHardware = (refuseDevice) => `(() => {
  if (!("gpu" in navigator)) return;
  const real = GPU.prototype.requestAdapter;
  GPU.prototype.requestAdapter = async function (...args) {
    const a = await real.apply(this, args);
    if (!a) return a;
    const i = a.info;
    const info = { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description, isFallbackAdapter: false };
    Object.defineProperty(a, "info", { value: info });
    Object.defineProperty(a, "isFallbackAdapter", { value: false });
    ${refuseDevice ? 'a.requestDevice = async () => { throw new Error("test: this adapter refuses a device"); };' : ""}
    return a;
  };
})();`;

// A fresh browser (nothing remembered): reconstruct the PNG under auto. With loseDevice, then destroy onnxruntime-web's
// GPU device (what a driver reset or the OS does) and reconstruct again at once, then ask for WebGPU by name.
async function autoBackendRun(refuseDevice, loseDevice = false) {
  const { browser, page, logs } = await openPage(url, { webgpu: true, initScript: asHardware(refuseDevice) });
  try {
    const r = await page.evaluate(async ([b64, loseDevice]) => {
      const photo = () => new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type: "image/png" });
      const res = { before: window.dcae.state.backend };
      try { res.reconstruct = (await window.dcae.reconstruct(photo())).pixels; }
      catch (e) { res.error = e.message; }
      const chosen = () => ({ vae_encoder: window.dcae.precisionOf("vae_encoder"), vae_decoder: window.dcae.precisionOf("vae_decoder") });
      Object.assign(res, { after: window.dcae.state.backend, label: document.querySelector("#threads").textContent, chosen: chosen(),
        messages: window.dcae.messages() });
      if (loseDevice) {
        window.dcae.state.ort.env.webgpu.device.destroy();
        const again = window.dcae.reconstruct(photo()); // started before the browser reports the loss
        try { res.afterLoss = { pixels: (await again).pixels, backend: window.dcae.state.backend, chosen: chosen() }; }
        catch (e) { res.afterLoss = { error: e.message }; }
        document.querySelector("#backend").value = "webgpu";
        await window.dcae.setBackend("webgpu");
        res.afterLoss.asked = window.dcae.state.backend;
        res.afterLoss.messages = window.dcae.messages();
      }
      return res;
    }, [png, loseDevice]);
    return { ...r, logs };
  } finally {
    await browser.close();
  }
}

const { browser, page, logs } = await openPage(url, { webgpu: true });
try {
  const adapter = await page.evaluate(async () => {
    const a = "gpu" in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    const i = a?.info || {};
    return a ? { vendor: i.vendor, architecture: i.architecture, shaderF16: a.features.has("shader-f16"),
      name: [i.vendor, i.architecture, i.description].filter(Boolean).join(" ") } : null; // as the page names it
  });
  if (!adapter) {
    console.log(JSON.stringify({ adapter: null, logs }));
  } else {
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
      window.dcae.state.ort.env.webgpu.device.destroy(); // WebGPU chosen by name: its device lost is an error in words
      try { await window.dcae.reconstruct("samples/coffee.jpg"); res.lost = "ran"; } catch (e) { res.lost = e.message; }
      return res;
    }, png);
    r.hardware = await autoBackendRun(false, true);
    r.refused = await autoBackendRun(true);
    console.log(JSON.stringify({ adapter, ...r, logs: logs.filter((l) => !l.includes("VerifyEachNodeIsAssignedToAnEp")) }));
  }
} finally {
  await browser.close();
}

// Browser tier: reconstruct a PNG and generate through the page (buttons and window.dcae), read
// the pixels back, try an undecodable file, take a screenshot. Prints one JSON line.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { openPage } from "./browser.mjs";

const [url, out] = process.argv.slice(2);
const { browser, page, logs } = await openPage(url);
try {
  const env = await page.evaluate(() => ({ isolated: crossOriginIsolated, threads: window.dcae.state.ort.env.wasm.numThreads,
    backend: window.dcae.state.backend, backendSaid: window.dcae.messages().filter((m) => m.startsWith("backend auto")) }));
  const png = readFileSync(join(out, "photo.png")).toString("base64");
  const defaultPrecision = await page.evaluate(() => document.querySelector("#precision").value);
  await page.selectOption("#precision", "fp32"); // pixel parity against Python's fp32; auto is checked at the end
  const reconstruct = await page.evaluate(async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const r = await window.dcae.reconstruct(new Blob([bytes], { type: "image/png" }));
    return { pixels: r.pixels, latentShape: r.latentShape, psnr: r.psnr };
  }, png);
  // generate with the page's own controls, as a user would
  await page.fill("#classes", "0, 2");
  await page.fill("#seed", "3");
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll("#gallery canvas").length === 2 && !window.dcae.state.busy,
    null, { timeout: 300000 });
  const generate = await page.evaluate(() => ({
    images: Array.from(document.querySelectorAll("#gallery canvas"),
      (c) => Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)),
    stats: document.querySelector("#generate-stats").textContent }));
  // an image the browser cannot decode: a visible message, and the page keeps working
  const bad = await page.evaluate(async () => {
    try { await window.dcae.reconstruct(new Blob([new Uint8Array([1, 2, 3, 4])], { type: "image/png" })); return null; }
    catch (e) { return e.message; }
  });
  const again = await page.evaluate(async () => (await window.dcae.reconstruct("samples/coffee.jpg")).psnr);
  await page.screenshot({ path: join(out, "screenshot.png"), fullPage: true });
  const messages = await page.evaluate(() => window.dcae.messages());
  // precision auto: timed on first use, remembered after a reload (localStorage)
  const autoRun = async () => page.evaluate(async () => {
    document.querySelector("#precision").value = "auto";
    document.querySelector("#precision").dispatchEvent(new Event("change"));
    const r = await window.dcae.reconstruct("samples/coffee.jpg");
    return { psnr: r.psnr, pixels: r.pixels, originalPixels: r.originalPixels, messages: window.dcae.messages(),
      chosen: { vae_encoder: window.dcae.precisionOf("vae_encoder"), vae_decoder: window.dcae.precisionOf("vae_decoder") } };
  });
  const autoFirst = await autoRun();
  await page.reload();
  await page.evaluate(() => window.dcae.ready);
  const autoAgain = await autoRun();
  console.log(JSON.stringify({ ...env, reconstruct, generate, messages, logs, defaultPrecision, autoFirst, autoAgain,
    bad_image_message: bad && messages.some((m) => m.includes("not an image")), page_still_works: Number.isFinite(again) }));
} finally {
  await browser.close();
}

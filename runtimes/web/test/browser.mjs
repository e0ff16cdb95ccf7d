// Shared by the browser-tier scripts: Debian's Chromium through playwright-core (no browser
// download), with the flags this closed network needs.
import { chromium } from "playwright-core";

// WebGPU without a GPU: Chromium's SwiftShader (Vulkan on the CPU) as the adapter. Slow, and without
// shader-f16, but the same WebGPU execution provider and shaders a real GPU gets.
export const SWIFTSHADER_WEBGPU = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader"];

// initScript: JavaScript run in the page before its own (a test's stand-in for hardware this machine lacks)
export async function openPage(url, { webgpu = false, initScript = null } = {}) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", ...(webgpu ? SWIFTSHADER_WEBGPU : ["--disable-gpu"])],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 1100 } });
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  if (initScript) await page.addInitScript(initScript);
  await page.goto(url);
  await page.waitForFunction(() => window.dcae && window.dcae.ready !== undefined);
  await page.evaluate(() => window.dcae.ready);
  return { browser, page, logs };
}

// Browser tier: a bundle without a transformer and with a corrupt encoder; WebGPU asked for on a
// browser without it. Each must be a visible message, and the page keeps working. One JSON line.
import { openPage } from "./browser.mjs";

const [url] = process.argv.slice(2);
const { browser, page } = await openPage(url);
try {
  const disabled = await page.evaluate(() => document.querySelector("#generate").disabled);
  const reason = await page.evaluate(() => document.querySelector("#generate-why").textContent);
  await page.click("#sample-buttons button");
  await page.waitForFunction(() => !window.dcae.state.busy);
  await page.selectOption("#backend", "webgpu");
  await page.waitForFunction(() => window.dcae.messages().some((m) => m.includes("WebGPU")), null, { timeout: 30000 });
  const backend = await page.evaluate(() => window.dcae.state.backend);
  const messages = await page.evaluate(() => window.dcae.messages());
  console.log(JSON.stringify({ generate_disabled: disabled, generate_reason: reason, messages, backend }));
} finally {
  await browser.close();
}

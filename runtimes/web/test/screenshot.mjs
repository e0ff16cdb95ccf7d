// The README screenshot: reconstruct a real photo and generate a row of digits through the page's
// own controls, then capture the page. Prints one JSON line (the page's stats).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { openPage } from "./browser.mjs";

const [url, out, classes] = process.argv.slice(2);
const { browser, page, logs } = await openPage(url);
try {
  const b64 = readFileSync(join(out, "photo.jpg")).toString("base64");
  const psnr = await page.evaluate(async (data) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    return (await window.dcae.reconstruct(new Blob([bytes], { type: "image/jpeg" }))).psnr;
  }, b64);
  if (classes !== "none") {  // "none": a bundle without a generator (the page says why generate is off)
    await page.fill("#classes", classes || "3, 1, 4, 1, 5, 9");
    await page.fill("#seed", "0");
    await page.click("#generate");
    await page.waitForFunction((n) => document.querySelectorAll("#gallery canvas").length === n && !window.dcae.state.busy,
      (classes || "3, 1, 4, 1, 5, 9").split(",").length, { timeout: 600000 });
  }
  await page.screenshot({ path: join(out, "screenshot.png"), fullPage: true });
  const stats = await page.evaluate(() => (document.querySelector("#generate-stats") || {}).textContent || "");
  console.log(JSON.stringify({ psnr, stats, messages: await page.evaluate(() => window.dcae.messages()), logs }));
} finally {
  await browser.close();
}

// Shared by the browser-tier scripts: Debian's Chromium through playwright-core (no browser
// download), with the flags this closed network needs.
import { chromium } from "playwright-core";

export async function openPage(url) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 1100 } });
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.dcae && window.dcae.ready !== undefined);
  await page.evaluate(() => window.dcae.ready);
  return { browser, page, logs };
}

// Browser tier: a bundle without a transformer and with a corrupt encoder. Prints one JSON line.
import { openPage } from "./browser.mjs";

const [url] = process.argv.slice(2);
const { browser, page } = await openPage(url);
try {
  const disabled = await page.evaluate(() => document.querySelector("#generate").disabled);
  const reason = await page.evaluate(() => document.querySelector("#generate-why").textContent);
  await page.click("#sample-buttons button");
  await page.waitForFunction(() => !window.dcae.state.busy);
  const messages = await page.evaluate(() => window.dcae.messages());
  console.log(JSON.stringify({ generate_disabled: disabled, generate_reason: reason, messages }));
} finally {
  await browser.close();
}

// Drives the system Chromium through the gateway's dashboard; run by dashboard_browser.rs.
// Usage: node dashboard.mjs <gateway url> <download dir>
// Protocol with the test: prints `loaded <log size>`, then waits for a line on stdin once
// the test has submitted more readings; prints what it saw and exits 0 when everything held.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const [url, downloads] = process.argv.slice(2);
if (!url || !downloads) {
  console.error("usage: node dashboard.mjs <gateway url> <download dir>");
  process.exit(2);
}
// A guard against a hung browser, not a performance assertion.
setTimeout(() => {
  console.error("gave up after 5 minutes");
  process.exit(3);
}, 300_000).unref();

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const profile = mkdtempSync(join(tmpdir(), "bitmote-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  acceptDownloads: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const wait = { timeout: 120_000 };
const count = (s) => Number(s.replace(/,/g, ""));
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(url);

  // Live numbers: the log size shows, then grows once the test submits readings.
  await page.waitForFunction(() => /^[\d,]+$/.test(document.getElementById("tree-size").textContent), null, wait);
  const before = count(await page.textContent("#tree-size"));
  console.log(`loaded ${before}`);
  await lines.next();
  await page.waitForFunction((n) => {
    const size = Number(document.getElementById("tree-size").textContent.replace(/,/g, ""));
    return size > n && Number(document.getElementById("readings-per-sec").textContent) > 0;
  }, before, wait);
  console.log(`live ${count(await page.textContent("#tree-size"))} readings, ${await page.textContent("#readings-per-sec")} readings/s`);

  // The Lightning part: the stand-in meter's session, and the URL that does not answer.
  await page.waitForSelector("#pay-sources .error", wait);
  const session = page.locator("#sessions tr", { hasText: "meter" }).first();
  await session.waitFor(wait);
  await page.waitForFunction(() => document.getElementById("plot-scale").textContent.includes(" W"), null, wait);
  console.log(`lightning: ${(await session.innerText()).replace(/\s+/g, " ")}`);
  console.log(`lightning error: ${await page.textContent("#pay-sources .error")}`);
  console.log(`plot: ${await page.textContent("#plot-scale")}`);

  // A confirmed anchor, its proof and .ots downloaded through the page's links.
  const row = page.locator("#anchors tr[data-state=confirmed]").first();
  await row.waitFor(wait);
  console.log(`anchor confirmed with ${await row.locator(".confirmations").textContent()} confirmations`);
  for (const [link, file] of [["a.proof", "proof.json"], ["a.ots", "reading.ots"]]) {
    const [download] = await Promise.all([page.waitForEvent("download", wait), row.locator(link).click()]);
    await download.saveAs(join(downloads, file));
    console.log(`downloaded ${file} (${download.suggestedFilename()})`);
  }

  // The verifier, run by the gateway from the page.
  await row.locator("button.verify").click();
  await page.waitForSelector("#verify-result[data-result]", wait);
  const result = await page.getAttribute("#verify-result", "data-result");
  console.log(`verify: ${result}`);
  console.log(await page.innerText("#verify-result"));
  if (process.env.BITMOTE_SCREENSHOT) await page.screenshot({ path: process.env.BITMOTE_SCREENSHOT, fullPage: true });
  process.exitCode = result === "verified" ? 0 : 1;
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit();

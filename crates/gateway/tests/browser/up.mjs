// Drives the system Chromium through the dashboard of a whole `bitmote up` (gateway and
// simulated fleet); run by crates/bitmote/tests/up_e2e.rs.
// Usage: node up.mjs <gateway url> [screenshot.png]
// Prints what it saw, one line per check, and exits 0 once the page has shown readings
// anchored and confirmed, the lock opened by a paid order, and a meter session whose
// payments grow.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, screenshot] = process.argv.slice(2);
if (!url) {
  console.error("usage: node up.mjs <gateway url> [screenshot.png]");
  process.exit(2);
}
// A guard against a hung browser, not a performance assertion.
setTimeout(() => {
  console.error("gave up after 8 minutes");
  process.exit(3);
}, 480_000).unref();

const profile = mkdtempSync(join(tmpdir(), "bitmote-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const wait = { timeout: 300_000, polling: 500 };
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(url);

  // Readings arrive from the fleet's sensors and are anchored; an anchor confirms.
  await page.waitForFunction(() => Number(document.getElementById("tree-size").textContent.replace(/,/g, "")) > 0, null, wait);
  const row = page.locator("#anchors tr[data-state=confirmed]").first();
  await row.waitFor({ timeout: wait.timeout });
  console.log(`anchor confirmed: ${(await row.innerText()).replace(/\s+/g, " ")}`);
  console.log(`log size ${await page.textContent("#tree-size")}, ${await page.textContent("#readings-per-sec")} readings/s`);
  const devices = await page.locator("#devices tr").count();
  console.log(`devices ${devices}`);

  // The rental lock: a payment order's rule fired and the lock acknowledged "unlock".
  const unlock = () => [...document.querySelectorAll("#actions tr")].find((tr) => {
    const td = [...tr.children].map((c) => c.textContent);
    return td[1]?.startsWith("order-") && td[2] === "lock-1" && td[3] === "unlock" && td[5] === "acked";
  });
  await page.waitForFunction(unlock, null, wait);
  console.log(`lock opened by a payment: ${await page.evaluate(() => {
    const tr = [...document.querySelectorAll("#actions tr")].find((tr) => {
      const td = [...tr.children].map((c) => c.textContent);
      return td[1]?.startsWith("order-") && td[3] === "unlock" && td[5] === "acked";
    });
    return tr.innerText.replace(/\s+/g, " ");
  })}`);
  const order = await page.evaluate(() => [...document.querySelectorAll("#rules tr")].map((tr) => tr.innerText).find((t) => t.startsWith("order-")) || "");
  console.log(`order rule: ${order.replace(/\s+/g, " ")}`);

  // The Lightning session: the meter's row, open, its payments growing.
  const paid = `(() => {
    const tr = [...document.querySelectorAll("#sessions tr")].find((tr) => {
      const td = [...tr.children].map((c) => c.textContent);
      return td[0] === "meter" && td[3].startsWith("open");
    });
    return tr ? Number(tr.children[9].textContent.replace(/,/g, "")) : -1;
  })()`;
  await page.waitForFunction(`${paid} > 0`, null, wait);
  const first = await page.evaluate(paid);
  await page.waitForFunction(`${paid} > ${first}`, null, wait);
  const session = page.locator("#sessions tr", { hasText: "meter" }).first();
  console.log(`meter streaming: paid ${first} sat, then ${await page.evaluate(paid)} sat: ${(await session.innerText()).replace(/\s+/g, " ")}`);
  // The meter pays through the gateway's Lightning node: the hub's fee shows.
  await page.waitForFunction(() => document.getElementById("pay-sources").textContent.includes("routing fees"), null, wait);
  console.log(`sources: ${(await page.innerText("#pay-sources")).replace(/\s+/g, " ")}`);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log("all seen");
  process.exitCode = 0;
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit();

// Drives one dashboard page in headless Chromium for the Rust tests
// (crates/testkit/tests/dashboard.rs), talking over stdin/stdout:
//
//   node page.mjs URL SCREENSHOT.png
//
// It loads URL, records console errors and every request, and prints one
// JSON line per event: {"ready": ...} once the page shows live data, then
// for each command line read on stdin:
//   wait SELECTOR REGEX SECONDS   -> {"wait": ..., "ok": bool, "text": ...}
//   shot                          -> writes the screenshot, {"shot": path}
//   quit                          -> {"errors": [...], "offsite": [...]} and exits
// "offsite" lists requests to anything but 127.0.0.0/8, ::1 or localhost.
import { chromium } from "./node_modules/playwright-core/index.mjs";
import * as readline from "node:readline";

const [url, shotPath] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const errors = [];
const offsite = [];

function local(u) {
  try {
    const h = new URL(u).hostname;
    return h === "localhost" || h === "[::1]" || /^127\./.test(h) || u.startsWith("data:");
  } catch {
    return false;
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
page.on("pageerror", (e) => errors.push(String(e)));
page.on("request", (r) => { if (!local(r.url())) offsite.push(r.url()); });
page.on("requestfailed", (r) => {
  // An EventSource closed by the page's end is not an error of the page.
  if (!r.url().endsWith("/events")) errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
});
await page.goto(url, { waitUntil: "load" });
say({ ready: true, title: await page.title() });

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  const [cmd, ...rest] = line.trim().split(" ");
  if (cmd === "wait") {
    const [selector, re, secs] = rest;
    const want = new RegExp(re);
    const end = Date.now() + Number(secs) * 1000;
    let text = "";
    let ok = false;
    while (Date.now() < end) {
      text = (await page.textContent(selector).catch(() => "")) || "";
      if (want.test(text)) { ok = true; break; }
      await page.waitForTimeout(100);
    }
    say({ wait: selector, ok, text });
  } else if (cmd === "shot") {
    await page.screenshot({ path: shotPath, fullPage: true });
    say({ shot: shotPath });
  } else if (cmd === "quit") {
    say({ errors, offsite });
    break;
  }
}
await browser.close();
process.exit(0);

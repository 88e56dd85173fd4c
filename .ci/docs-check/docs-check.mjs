// Loads ivr's /docs in headless Chromium against a running server and checks what a person
// would: every operation of /openapi.json is on the page, "Authorize" gets a token through the
// OAuth2 password flow, "Try it out" runs a call list with it, and the page asks nothing of any
// host but the server. Usage: node docs-check.mjs BASE_URL USERNAME PASSWORD [SCREENSHOT]
import { chromium } from "playwright-core";

const [base, username, password, screenshot = "/tmp/ivr-docs.png"] = process.argv.slice(2);
if (!base || !username || !password) {
  console.error("usage: node docs-check.mjs BASE_URL USERNAME PASSWORD [SCREENSHOT]");
  process.exit(2);
}
const origin = new URL(base).origin;
const failures = [];
const fail = (what) => failures.push(what);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.setDefaultTimeout(20000);
  const requests = [];
  page.on("request", (request) => {
    const url = new URL(request.url());
    requests.push(request.url());
    if (url.protocol !== "data:" && url.protocol !== "blob:" && url.origin !== origin) {
      fail(`request to another host: ${request.method()} ${request.url()}`);
    }
  });
  page.on("pageerror", (error) => fail(`script error: ${error.message}`));
  page.on("console", (message) => {
    // A CSP violation or a failed load shows up here.
    if (message.type() === "error") fail(`console error: ${message.text()}`);
  });

  const response = await page.goto(`${base}/docs`, { waitUntil: "networkidle" });
  if (response.status() !== 200) fail(`/docs answered ${response.status()}`);
  if (!(response.headers()["content-security-policy"] || "").includes("default-src 'none'")) {
    fail("/docs has no Content-Security-Policy");
  }

  // Every operation of the document is rendered, POST /api/v1/calls among them.
  const spec = await (await fetch(`${base}/openapi.json`)).json();
  await page.locator("#operations-calls-createCall").waitFor();
  let operations = 0;
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      operations += 1;
      const block = page.locator(`#operations-${op.tags[0]}-${op.operationId}`);
      if ((await block.count()) !== 1) {
        fail(`${method.toUpperCase()} ${path} (${op.operationId}) is not on the page`);
        continue;
      }
      const shown = (await block.locator(".opblock-summary-path").innerText()).replace(/\u200b/g, "");
      if (shown.trim() !== path) fail(`${op.operationId} shows the path ${shown}, not ${path}`);
    }
  }
  console.log(`docs: ${operations} operations listed`);

  // Authorize: the OAuth2 password flow against /api/v1/token.
  await page.locator("button.authorize").first().click();
  const dialog = page.locator(".dialog-ux .modal-ux");
  await dialog.locator("#oauth_username").fill(username);
  await dialog.locator("#oauth_password").fill(password);
  const tokenAnswer = page.waitForResponse((r) => r.url() === `${origin}/api/v1/token`);
  await dialog.locator("button[aria-label=\"Apply given OAuth2 credentials\"]").click();
  const token = await tokenAnswer;
  if (token.status() !== 200) fail(`Authorize: /api/v1/token answered ${token.status()}`);
  await dialog.locator("button", { hasText: "Logout" }).first().waitFor();
  await dialog.locator("button.close-modal").first().click();
  console.log("docs: Authorize got a token");

  // Try it out: GET /api/v1/calls with the token.
  const list = page.locator("#operations-calls-listCalls");
  await list.locator(".opblock-summary").click();
  const listAnswer = page.waitForResponse((r) => r.url().startsWith(`${origin}/api/v1/calls`) && r.request().method() === "GET");
  await list.locator("button.execute").click();
  const listed = await listAnswer;
  if (listed.status() !== 200) fail(`Try it out: GET /api/v1/calls answered ${listed.status()}`);
  if (!(listed.request().headers()["authorization"] || "").startsWith("Bearer ")) {
    fail("Try it out: the request carried no bearer token");
  }
  await list.locator(".responses-wrapper .live-responses-table").waitFor();
  console.log(`docs: Try it out listed calls (${listed.status()})`);

  await list.locator(".opblock-summary").click();
  await page.evaluate(() => { document.activeElement?.blur(); window.scrollTo(0, 0); });
  await page.screenshot({ path: screenshot });
  console.log(`docs: ${requests.length} requests, all to ${origin}; screenshot ${screenshot}`);
} finally {
  await browser.close();
}
if (failures.length) {
  for (const f of failures) console.error(`docs check: ${f}`);
  process.exit(1);
}
console.log("docs check: ok");

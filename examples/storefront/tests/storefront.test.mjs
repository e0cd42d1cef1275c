// The buyer's page in a real browser: headless Chromium driven by playwright-core,
// against a running boxoffice that serves the built page at /shop/ (the fleet's or
// compose's nginx). Every check of a sale is made against the API, not the page.
//
//   BOXOFFICE_URL=http://127.0.0.1:3000 ADMIN_TOKEN=… BUYER_JWT_KEY=… npm test
//
// CHROMIUM names the browser (default /usr/bin/chromium, Debian's package);
// SCREENSHOT, if set, is where the page is pictured for the README.

import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";

const base = process.env.BOXOFFICE_URL ?? "http://127.0.0.1:3000";
const adminToken = process.env.ADMIN_TOKEN;
const buyerKey = process.env.BUYER_JWT_KEY;
if (!adminToken || !buyerKey) throw new Error("set ADMIN_TOKEN and BUYER_JWT_KEY (the server's)");

const phone = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 };

let browser;
before(async () => {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" });
});
after(async () => {
  await browser?.close();
});

async function call(method, path, { body, headers = {} } = {}) {
  const response = await fetch(base + path, {
    method,
    headers: { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : undefined, headers: response.headers };
}

async function createEvent(fields) {
  const created = await call("POST", "/api/v1/events", {
    body: { name: `Storefront test ${randomUUID().slice(0, 8)}`, ...fields },
    headers: { Authorization: `Bearer ${adminToken}` },
  });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  return created.body;
}

const event = async (id) => (await call("GET", `/api/v1/events/${id}`)).body;

/** An HS256 buyer JWT, as the site's sign-in would hand it to the page. */
function buyerToken(sub) {
  const b64 = (data) => Buffer.from(data).toString("base64url");
  const head = b64(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 600 }));
  const signature = createHmac("sha256", buyerKey).update(`${head}.${claims}`).digest("base64url");
  return `${head}.${claims}.${signature}`;
}

/** A new buyer (own sessionStorage) on a phone, on the page of one event. */
async function open(eventId, { fragment = "", options = phone } = {}) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  page.on("console", (message) => message.type() === "error" && problems.push(`${message.text()} (${message.location().url})`));
  await page.goto(`${base}/shop/?event=${eventId}${fragment}`);
  return { page, context, problems };
}

/** Who a token names (`sub`). */
const subOf = (token) => JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString()).sub;

/** Who a request of the page was sent as, or "anonymous". */
function sentAs(request) {
  const token = request.headers().authorization?.replace(/^Bearer /, "");
  return token ? subOf(token) : "anonymous";
}

/** The buyer follows the site's sign-in link in this tab, and accepts it. */
async function signIn(page, eventId, sub) {
  await page.goto("about:blank");
  await page.goto(`${base}/shop/?event=${eventId}#buyer=${buyerToken(sub)}`);
  await page.getByRole("alert").getByText(`Sign in as ${sub}?`, { exact: true }).waitFor();
  await page.getByRole("button", { name: "Accept" }).click();
  await page.getByText(`Signed in as ${sub}`, { exact: true }).waitFor();
}

/** Who (`sub`) the token the page keeps names, or null when it keeps none. */
async function storedBuyer(page) {
  const token = await page.evaluate(() => sessionStorage.getItem("boxoffice.buyerToken"));
  return token && subOf(token);
}

/** Every POST of a purchase the page sends, with its Idempotency-Key. */
function purchasesSent(page) {
  const sent = [];
  page.on("request", (request) => {
    if (request.method() === "POST" && /\/purchase$/.test(request.url())) sent.push(request.headers()["idempotency-key"]);
  });
  return sent;
}

test("a purchase succeeds, made with the keyboard alone, and the seats left follow it", async () => {
  const { id } = await createEvent({ totalSeats: 10 });
  const { page, context, problems } = await open(id);
  await page.getByText("10 of 10 seats left").waitFor();

  await page.getByLabel("Number of tickets").focus();
  await page.getByLabel("Number of tickets").selectOption("2");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), "Buy now");
  await page.keyboard.press("Enter");

  const receipt = page.locator("#receipt").getByText(/2 tickets bought\. Your order number is/);
  await receipt.waitFor();
  const purchaseId = (await receipt.textContent()).match(/[0-9a-f-]{36}/)[0];
  await page.getByText("8 of 10 seats left").waitFor();

  assert.equal((await event(id)).seatsSold, 2);
  const sale = await call("GET", `/api/v1/events/${id}/purchases/${purchaseId}`);
  assert.equal(sale.status, 200, JSON.stringify(sale.body));
  assert.equal(sale.body.quantity, 2);
  // Nothing wider than the phone's screen.
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth));
  assert.deepEqual(problems, []);
  await context.close();
});

test("a double click makes one sale", async () => {
  const { id } = await createEvent({ totalSeats: 10 });
  const { page, context } = await open(id);
  const sent = purchasesSent(page);
  await page.getByRole("button", { name: "Buy now" }).dblclick();
  await page.locator("#receipt").getByText(/1 ticket bought/).waitFor();
  // A refresh of the seats comes every 2 s: a second sale would show by then.
  await page.waitForTimeout(2500);
  await page.getByText("9 of 10 seats left").waitFor();
  assert.equal((await event(id)).seatsSold, 1);
  assert.equal(new Set(sent).size, 1, `keys sent: ${sent}`);
  await context.close();
});

test("an answer lost on the way back is retried with the same key: one sale, and its receipt", async () => {
  const { id } = await createEvent({ totalSeats: 10 });
  const { page, context } = await open(id);
  const sent = purchasesSent(page);
  let firstSale;
  // The first purchase reaches the server and sells; the browser never hears of it.
  await page.route("**/api/v1/events/*/purchase", async (route) => {
    if (firstSale === undefined) {
      firstSale = await (await route.fetch()).json();
      await route.abort("connectionreset");
    } else {
      await route.continue();
    }
  });
  await page.getByLabel("Number of tickets").selectOption("3");
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.locator("#receipt").getByText(/3 tickets bought/).waitFor();

  assert.ok(firstSale?.purchaseId, "the first attempt sold");
  assert.ok(sent.length >= 2, `the page retried (${sent.length} attempts)`);
  assert.equal(new Set(sent).size, 1, `one key for every attempt: ${sent}`);
  assert.match(await page.getByText(/Your order number is/).textContent(), new RegExp(firstSale.purchaseId));
  assert.equal((await event(id)).seatsSold, 3);
  await context.close();
});

test("when no answer comes back at all, Try again and a reload finish the same order: one sale", async () => {
  const { id } = await createEvent({ totalSeats: 10 });
  const { page, context } = await open(id);
  const sent = purchasesSent(page);
  const sales = [];
  // Every attempt reaches the server; no answer reaches the page.
  await page.route("**/api/v1/events/*/purchase", async (route) => {
    sales.push((await (await route.fetch()).json()).purchaseId);
    await route.abort("connectionreset");
  });
  await page.getByLabel("Number of tickets").selectOption("2");
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.getByRole("alert").getByText(/did not answer\. Your order is kept/).waitFor({ timeout: 15_000 });
  assert.equal(sent.length, 4, "four attempts, then the buyer decides");
  assert.ok(await page.getByLabel("Number of tickets").isDisabled(), "the quantity of a pending order is fixed");

  await page.getByRole("button", { name: "Try again" }).click();
  await page.getByRole("alert").getByText(/did not answer/).waitFor({ timeout: 15_000 });
  assert.equal(sent.length, 8);

  // The connection is back; the buyer reloads instead of clicking.
  await page.unroute("**/api/v1/events/*/purchase");
  await page.reload();
  await page.locator("#receipt").getByText(/2 tickets bought/).waitFor();
  assert.equal(new Set(sent).size, 1, `one key for every attempt: ${sent}`);
  assert.equal(new Set(sales).size, 1, "every attempt got the first sale back");
  assert.match(await page.locator("#receipt-text").textContent(), new RegExp(sales[0]));
  assert.equal((await event(id)).seatsSold, 2);
  await context.close();
});

test("a sold-out event says so, both when the page opens and when the last seats go first", async () => {
  const { id } = await createEvent({ totalSeats: 2 });
  const { page, context } = await open(id);
  await page.getByText("2 of 2 seats left").waitFor();

  // Someone else takes the last seats while this buyer looks at the page; its
  // refresh of the seats is held back until the buyer has clicked.
  let clicked = false;
  page.on("request", (request) => request.method() === "POST" && (clicked = true));
  await page.route(`**/api/v1/events/${id}`, (route) => (clicked ? route.continue() : route.abort()));
  const other = await call("POST", `/api/v1/events/${id}/purchase`, {
    body: { quantity: 2 },
    headers: { "Idempotency-Key": randomUUID() },
  });
  assert.equal(other.status, 200);
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.getByRole("alert").getByText("Sold out. There are no seats left for this event.").waitFor();
  await page.getByText("Sold out", { exact: true }).waitFor();
  assert.equal(await page.getByRole("button", { name: "Buy now" }).isVisible(), false);
  assert.equal((await event(id)).seatsSold, 2);

  const later = await open(id);
  await later.page.getByText("Sold out", { exact: true }).waitFor();
  assert.equal(await later.page.getByRole("button", { name: "Buy now" }).isVisible(), false);
  await later.context.close();
  await context.close();
});

test("a hold counts down and, left alone, shows as expired with its seats back on sale", async () => {
  const { id } = await createEvent({ totalSeats: 5, holdSeconds: 3 });
  const { page, context } = await open(id);
  await page.getByLabel("Number of tickets").selectOption("2");
  const holds = [];
  page.on("response", async (response) => {
    if (response.request().method() === "POST" && /\/holds$/.test(response.url())) holds.push(await response.json());
  });
  await page.getByRole("button", { name: "Hold for 3 seconds" }).click();
  await page.locator("#held").getByText("2 tickets held").waitFor();
  assert.match(await page.getByRole("timer").textContent(), /^0:0[1-3]$/);
  await page.getByText("3 of 5 seats left").waitFor();

  await page.getByRole("alert").getByText("Your hold expired, and the seats went back on sale.").waitFor({ timeout: 10_000 });
  assert.equal(await page.getByRole("button", { name: "Buy these tickets" }).isVisible(), false);
  await page.getByText("5 of 5 seats left").waitFor();
  const hold = await call("GET", `/api/v1/events/${id}/holds/${holds[0].holdId}`);
  assert.equal(hold.body.state, "expired");
  assert.equal((await event(id)).seatsSold, 0);
  await context.close();
});

test("a hold confirmed in time is a sale; a released one gives its seats back", async () => {
  const { id } = await createEvent({ name: "Spring concert", totalSeats: 5, holdSeconds: 300 });
  const { page, context } = await open(id);
  await page.getByRole("button", { name: "Hold for 5 minutes" }).click();
  await page.locator("#held").getByText("1 ticket held").waitFor();
  assert.match(await page.getByRole("timer").textContent(), /^[45]:\d\d$/);
  if (process.env.SCREENSHOT) {
    const bottom = await page.evaluate(() => document.querySelector("main").getBoundingClientRect().bottom);
    await page.screenshot({ path: process.env.SCREENSHOT, clip: { x: 0, y: 0, width: 390, height: Math.ceil(bottom) + 8 } });
  }
  await page.getByRole("button", { name: "Buy these tickets" }).click();
  await page.locator("#receipt").getByText(/1 ticket bought/).waitFor();
  assert.equal((await event(id)).seatsSold, 1);

  await page.getByRole("button", { name: "Buy more tickets" }).click();
  await page.getByRole("button", { name: "Hold for 5 minutes" }).click();
  await page.locator("#held").getByText("1 ticket held").waitFor();
  await page.getByRole("button", { name: "Release them" }).click();
  await page.getByText("Released. The seats are back on sale.").waitFor();
  await page.getByText("4 of 5 seats left").waitFor();
  await context.close();
});

test("in a waiting room the buyer sees the opening, their turn, and then buys", async () => {
  const opensAt = new Date(Date.now() + 3000).toISOString();
  const { id } = await createEvent({ totalSeats: 50, queue: { opensAt, admitPerSecond: 20, admissionSeconds: 120 } });
  const signedOut = await open(id);
  await signedOut.page.getByText("This sale has a waiting room. Please sign in to join it.").waitFor();
  assert.equal(await signedOut.page.getByRole("button", { name: "Buy now" }).isVisible(), false);
  await signedOut.context.close();

  const { page, context } = await open(id, { fragment: `#buyer=${buyerToken("storefront-ann")}` });
  await page.getByRole("button", { name: "Accept" }).click();
  await page.getByText("Signed in as storefront-ann").waitFor();
  assert.equal(new URL(page.url()).hash, "", "the token leaves the address bar");
  await page.getByRole("button", { name: "Join the queue" }).click();
  await page.getByText(/The sale opens at .*; everyone who joined before then/).waitFor();
  assert.equal(await page.getByRole("button", { name: "Buy now" }).isVisible(), false);
  await page.getByText(/It is your turn\. You can buy until/).first().waitFor({ timeout: 15_000 });
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.locator("#receipt").getByText(/1 ticket bought/).waitFor();
  assert.equal((await event(id)).seatsSold, 1);
  await context.close();
});

test("a token in a link signs in only when the buyer accepts it, and leaves the address bar at once", async () => {
  const { id } = await createEvent({ totalSeats: 10 });
  const ann = buyerToken("storefront-ann");
  const bob = buyerToken("storefront-bob");

  // Even a first token is asked about, by the name it carries; declined, it is dropped.
  const { page, context, problems } = await open(id, { fragment: `#buyer=${ann}` });
  const sentBy = [];
  page.on("request", (request) => request.url().includes("/api/") && sentBy.push(sentAs(request)));
  await page.getByRole("alert").getByText("Sign in as storefront-ann?", { exact: true }).waitFor();
  assert.equal(new URL(page.url()).hash, "", "the token leaves the address bar before any answer");
  assert.equal(await storedBuyer(page), null);
  assert.equal(await page.getByRole("button", { name: "Keep current" }).isVisible(), false);
  for (const name of ["Accept", "Decline"]) {
    const box = await page.getByRole("button", { name }).boundingBox();
    assert.ok(box && box.height >= 44, `${name} is at least 44 px high (${box?.height})`);
  }
  assert.equal(await page.getByRole("button", { name: "Buy now" }).isVisible(), false, "nothing to buy before the answer");
  await page.getByRole("button", { name: "Decline" }).click();
  await page.getByText("10 of 10 seats left").waitFor();
  assert.equal(await page.locator("#who").textContent(), "");
  assert.equal(await storedBuyer(page), null);

  await signIn(page, id, "storefront-ann");
  assert.equal(await storedBuyer(page), "storefront-ann");

  // Someone else's link, opened while Ann is signed in: she stays Ann until she says.
  await page.goto("about:blank");
  await page.goto(`${base}/shop/?event=${id}#buyer=${bob}`);
  await page.getByRole("alert").getByText("Sign in as storefront-bob?", { exact: true }).waitFor();
  assert.equal(new URL(page.url()).hash, "", "the token leaves the address bar before any answer");
  assert.equal(await page.locator("#who").textContent(), "Signed in as storefront-ann");
  assert.equal(await storedBuyer(page), "storefront-ann");
  assert.equal(await page.getByRole("button", { name: "Decline" }).isVisible(), false);
  await page.getByRole("button", { name: "Keep current" }).click();
  await page.getByText("10 of 10 seats left").waitFor();
  assert.equal(await storedBuyer(page), "storefront-ann");

  // A link followed while the page is open changes only the fragment: asked the same.
  await page.evaluate((token) => (location.hash = `buyer=${token}`), bob);
  await page.getByRole("alert").getByText("Sign in as storefront-bob?", { exact: true }).waitFor();
  await page.waitForFunction(() => location.hash === "");
  assert.equal(await storedBuyer(page), "storefront-ann");
  assert.ok(!sentBy.includes("storefront-bob"), `nothing was sent as Bob before he was accepted: ${sentBy}`);

  await page.getByRole("button", { name: "Accept" }).click();
  await page.getByText("Signed in as storefront-bob", { exact: true }).waitFor();
  assert.equal(await storedBuyer(page), "storefront-bob");
  const buyers = [];
  page.on("request", (request) => request.method() === "POST" && buyers.push(sentAs(request)));
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.locator("#receipt").getByText(/1 ticket bought/).waitFor();
  assert.deepEqual(buyers, ["storefront-bob"]);
  assert.deepEqual(problems, []);
  await context.close();
});

test("what one buyer started in a tab is not resumed for another who signs in there, and is when they are back", async () => {
  const { id } = await createEvent({ totalSeats: 10, holdSeconds: 300 });
  const { page, context } = await open(id);
  const purchases = [];
  page.on("request", (request) => {
    if (request.method() === "POST" && /\/purchase$/.test(request.url())) {
      purchases.push({ key: request.headers()["idempotency-key"], buyer: sentAs(request) });
    }
  });
  await signIn(page, id, "storefront-ann");

  // Ann's purchase never reaches the server: her intent stays pending.
  await page.route("**/api/v1/events/*/purchase", (route) => route.abort("connectionreset"));
  await page.getByLabel("Number of tickets").selectOption("2");
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.getByRole("alert").getByText(/did not answer/).waitFor({ timeout: 15_000 });
  const annKey = purchases[0].key;
  const tries = purchases.length;

  // Bob signs in in the same tab: no Try again, no quantity fixed, nothing sent.
  await signIn(page, id, "storefront-bob");
  await page.getByText("10 of 10 seats left").waitFor();
  await page.waitForTimeout(1000);
  assert.equal(purchases.length, tries, "Ann's order was not sent again as Bob");
  assert.equal(await page.getByRole("button", { name: "Buy now" }).isVisible(), true);
  assert.equal(await page.getByLabel("Number of tickets").isDisabled(), false);
  // Bob holds a seat; then Ann comes back.
  await page.getByRole("button", { name: "Hold for 5 minutes" }).click();
  await page.locator("#held").getByText("1 ticket held").waitFor();

  await page.unroute("**/api/v1/events/*/purchase");
  await signIn(page, id, "storefront-ann");
  // Her pending order goes through as it was, and Bob's hold is not hers to see.
  await page.locator("#receipt").getByText(/2 tickets bought/).waitFor();
  assert.equal(await page.locator("#held").isVisible(), false);
  assert.ok(purchases.length > tries);
  assert.deepEqual(new Set(purchases.map((p) => p.key)), new Set([annKey]), "one key, Ann's");
  assert.deepEqual(new Set(purchases.map((p) => p.buyer)), new Set(["storefront-ann"]), "always sent as Ann");

  // Back as Bob: his hold, not Ann's receipt.
  await signIn(page, id, "storefront-bob");
  await page.locator("#held").getByText("1 ticket held").waitFor();
  assert.equal(await page.locator("#receipt").isVisible(), false);
  const after = await event(id);
  assert.equal(after.seatsSold, 2);
  assert.equal(after.seatsHeld, 1);
  await context.close();
});

test("the page, its index and its bundles all carry the security headers", async () => {
  const html = await (await fetch(`${base}/shop/`)).text();
  const bundle = html.match(/src="(\/shop\/assets\/[^"]+\.js)"/)?.[1];
  assert.ok(bundle, "index.html names its bundle");
  for (const path of ["/shop", "/shop/", "/shop/index.html", bundle]) {
    const response = await fetch(base + path, { redirect: "manual" });
    assert.equal(response.status, path === "/shop" ? 301 : 200, path);
    const csp = response.headers.get("content-security-policy") ?? "";
    assert.match(csp, /default-src 'self'/, path);
    assert.match(csp, /frame-ancestors 'none'/, path);
    assert.equal(response.headers.get("x-content-type-options"), "nosniff", path);
    assert.equal(response.headers.get("referrer-policy"), "no-referrer", path);
  }
});

test("Swagger UI at /docs works under its Content-Security-Policy, and the API's answers forbid framing", async () => {
  const page = await browser.newPage();
  const refused = [];
  page.on("console", (message) => {
    if (/Content.Security.Policy/i.test(message.text())) refused.push(message.text());
  });
  const response = await page.goto(`${base}/docs`);
  assert.match(response.headers()["content-security-policy"] ?? "", /frame-ancestors 'none'/);
  // Drawn by Swagger UI's inline script: absent if the policy refused it.
  await page.locator(".swagger-ui .info", { hasText: "Sells seats to a flash crowd" }).waitFor({ timeout: 10_000 });
  // "Try it out" fetches from the same origin.
  const answer = await page.evaluate(async () => (await fetch("/api/v1/events")).status);
  assert.equal(answer, 200);
  assert.deepEqual(refused, []);
  await page.close();
  for (const path of ["/api/v1/events", "/health"]) {
    const api = await fetch(base + path);
    assert.equal(api.headers.get("content-security-policy"), "default-src 'none'; frame-ancestors 'none'", path);
    assert.equal(api.headers.get("x-content-type-options"), "nosniff", path);
  }
});

test("an order refused for its sign-in is kept, and finished with the same key when the page opens again", async () => {
  const { id } = await createEvent({ totalSeats: 10, maxPerBuyer: 4 });
  const { page, context } = await open(id);
  await signIn(page, id, "kept-order");
  const sent = purchasesSent(page);
  let firstSale;
  // The first attempt sells; the answer the page gets says the sign-in was refused.
  await page.route("**/api/v1/events/*/purchase", async (route) => {
    if (firstSale === undefined) {
      firstSale = await (await route.fetch()).json();
      await route.fulfill({ status: 401, contentType: "application/json", body: JSON.stringify({ error: "UNAUTHORIZED", message: "sign in again" }) });
    } else {
      await route.continue();
    }
  });
  await page.getByLabel("Number of tickets").selectOption("2");
  await page.getByRole("button", { name: "Buy now" }).click();
  await page.getByRole("alert").waitFor();
  assert.ok(firstSale?.purchaseId, "the first attempt sold");

  // Signed in anew (the stored token still stands here): the page opens again.
  await page.reload();
  await page.locator("#receipt").getByText(/2 tickets bought/).waitFor();
  assert.equal(new Set(sent).size, 1, `one key for every attempt: ${sent}`);
  assert.match(await page.locator("#receipt-text").textContent(), new RegExp(firstSale.purchaseId));
  assert.equal((await event(id)).seatsSold, 2);
  await context.close();
});

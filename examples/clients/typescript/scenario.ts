// A client developer's first session with boxoffice, through the TypeScript types
// openapi-typescript generates from openapi/openapi.json and openapi-fetch:
//
//   npm install && npm run generate && npm run build
//   npm run scenario -- BASE_URL ADMIN_TOKEN BUYER_JWT_KEY
//
// Buys, replays, reuses a key with another quantity, sells out, sends a bad quantity,
// holds and confirms, and joins a waiting room until admitted. The compiler checks
// every field used against the spec; at run time each answer's status and error code
// are checked. Exits non-zero on the first surprise.

import { createHmac, randomUUID } from "node:crypto";
import createClient from "openapi-fetch";
import type { components, paths } from "./generated/api.js";

type ErrorCode = components["schemas"]["ErrorCode"];

const [baseUrl, adminToken, buyerKey] = process.argv.slice(2);
if (!baseUrl || !adminToken || !buyerKey) {
  console.error("usage: scenario BASE_URL ADMIN_TOKEN BUYER_JWT_KEY");
  process.exit(2);
}

/** An HS256 JWT for `sub`, as the buyers' identity provider would sign it. */
function buyerToken(sub: string): string {
  const b64 = (data: string | Buffer) => Buffer.from(data).toString("base64url");
  const head = b64(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 600 }));
  const sig = createHmac("sha256", buyerKey).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

function fail(message: string): never {
  console.error(`typescript scenario: ${message}`);
  process.exit(1);
}

function ok(what: string) {
  console.log(`ok   ${what}`);
}

/** Checks an error answer's status and typed code. */
function refused(what: string, status: number, error: { error: ErrorCode } | undefined, code: ErrorCode) {
  if (error?.error !== code) fail(`${what}: expected ${code}, got ${status} ${JSON.stringify(error)}`);
  ok(`${what}: ${status} ${code}`);
}

const admin = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${adminToken}` } });
const buyer = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${buyerToken("ts-buyer")}` } });

const created = await admin.POST("/api/v1/events", { body: { name: "typescript scenario", totalSeats: 3 } });
if (!created.data) fail(`create an event: ${created.response.status} ${JSON.stringify(created.error)}`);
const event = created.data.id;
ok("create an event");

const buy = (quantity: number, key: string, admission?: string) =>
  buyer.POST("/api/v1/events/{id}/purchase", {
    params: {
      path: { id: event },
      header: { "Idempotency-Key": key, ...(admission ? { "Admission-Token": admission } : {}) },
    },
    body: { quantity },
  });

const key = randomUUID();
const first = await buy(2, key);
if (!first.data) fail(`buy 2 of 3: ${first.response.status} ${JSON.stringify(first.error)}`);
ok(`buy 2 of 3: purchase ${first.data.purchaseId}, ${first.data.seatsRemaining} left`);
const again = await buy(2, key);
if (again.data?.purchaseId !== first.data.purchaseId || again.response.headers.get("idempotent-replayed") !== "true") {
  fail(`the replay is not the first sale: ${JSON.stringify(again.data)}`);
}
ok("the same request again: the first purchase id, Idempotent-Replayed: true");
const reused = await buy(1, key);
refused("the same key with another quantity", reused.response.status, reused.error, "IDEMPOTENCY_KEY_REUSED");
const soldOut = await buy(2, randomUUID());
refused("2 more when 1 is left", soldOut.response.status, soldOut.error, "SOLD_OUT");
const bad = await buy(11, randomUUID());
refused("quantity 11", bad.response.status, bad.error, "INVALID_QUANTITY");

const held = await buyer.POST("/api/v1/events/{id}/holds", {
  params: { path: { id: event }, header: { "Idempotency-Key": randomUUID() } },
  body: { quantity: 1 },
});
if (!held.data) fail(`hold the last seat: ${held.response.status} ${JSON.stringify(held.error)}`);
ok(`hold the last seat until ${held.data.expiresAt}`);
const confirmed = await buyer.POST("/api/v1/events/{id}/holds/{holdId}/confirm", {
  params: { path: { id: event, holdId: held.data.holdId } },
});
if (confirmed.data?.purchaseId !== held.data.holdId || confirmed.data.seatsRemaining !== 0) {
  fail(`confirm: ${confirmed.response.status} ${JSON.stringify(confirmed.data ?? confirmed.error)}`);
}
ok("confirm it: the sale carries the hold's id");

const queued = await admin.POST("/api/v1/events", {
  body: {
    name: "typescript queue",
    totalSeats: 5,
    queue: { opensAt: new Date(Date.now() - 1000).toISOString(), admitPerSecond: 100, admissionSeconds: 60 },
  },
});
if (!queued.data) fail(`create a queued event: ${queued.response.status} ${JSON.stringify(queued.error)}`);
const queuedId = queued.data.id;
const sneak = await buyer.POST("/api/v1/events/{id}/purchase", {
  params: { path: { id: queuedId }, header: { "Idempotency-Key": randomUUID() } },
  body: { quantity: 1 },
});
refused("buy without admission", sneak.response.status, sneak.error, "ADMISSION_REQUIRED");
const joined = await buyer.POST("/api/v1/events/{id}/queue", { params: { path: { id: queuedId } } });
if (!joined.data) fail(`join: ${joined.response.status} ${JSON.stringify(joined.error)}`);
let status = joined.data;
ok(`join the waiting room: ticket ${status.ticket}`);
for (let i = 0; i < 100 && !status.admitted; i++) {
  await new Promise((resolve) => setTimeout(resolve, Math.min(status.pollAfterMs ?? 1000, 1000)));
  const polled = await buyer.GET("/api/v1/events/{id}/queue/{ticket}", {
    params: { path: { id: queuedId, ticket: status.ticket } },
  });
  if (!polled.data) fail(`poll: ${polled.response.status} ${JSON.stringify(polled.error)}`);
  status = polled.data;
}
if (!status.admitted || !status.admissionToken) fail("never admitted");
const admitted = await buyer.POST("/api/v1/events/{id}/purchase", {
  params: {
    path: { id: queuedId },
    header: { "Idempotency-Key": randomUUID(), "Admission-Token": status.admissionToken },
  },
  body: { quantity: 1 },
});
if (!admitted.data) fail(`buy with the admission: ${admitted.response.status} ${JSON.stringify(admitted.error)}`);
ok("buy with the admission");
console.log("typescript scenario passed");

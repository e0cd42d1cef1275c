// The API client generated from openapi/openapi.json (openapi-typescript types,
// openapi-fetch calls), and what the page needs around it: the buyer's token, the
// server's clock, and the one rule for retrying.

import createClient from "openapi-fetch";
import type { components, paths } from "./generated/api";

export type Event = components["schemas"]["Event"];
export type ErrorBody = components["schemas"]["ErrorBody"];
export type ErrorCode = components["schemas"]["ErrorCode"];
export type PurchaseOk = components["schemas"]["PurchaseOk"];
export type HoldCreated = components["schemas"]["HoldCreated"];
export type HoldInfo = components["schemas"]["HoldInfo"];
export type QueueStatus = components["schemas"]["QueueStatus"];

// Same origin as the page: nginx serves both /shop/ and /api/.
export const api = createClient<paths>({ baseUrl: location.origin });

const TOKEN_KEY = "boxoffice.buyerToken";

/**
 * The buyer's JWT, kept in the tab's sessionStorage, as it was when the page loaded.
 * A page signs in once: a new buyer is a new page (`adoptToken`), so nothing one
 * buyer started, in memory or on its way, ever goes out with another's token.
 */
export const signedIn: string | undefined = sessionStorage.getItem(TOKEN_KEY) ?? undefined;

/**
 * A token handed over in the URL fragment (`/shop/#buyer=<jwt>`, never sent to a
 * server), taken out of the address bar at once so it is not bookmarked or shared.
 * It is not signed in with: anyone can send a link that carries their own token, and
 * a buyer who followed it would buy as them. The page asks first.
 */
export function tokenFromLink(): string | undefined {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("buyer")) return undefined;
  const fromLink = fragment.get("buyer");
  fragment.delete("buyer");
  const rest = fragment.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return fromLink || undefined;
}

/** Signs in with a token the buyer accepted, by loading the page again as them. */
export function adoptToken(token: string) {
  sessionStorage.setItem(TOKEN_KEY, token);
  location.reload();
}

/** Who the token names (`sub`), for display only: the server verifies it. */
export function buyerName(token: string): string | undefined {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    // UTF-8, so a name beyond ASCII reads as written.
    const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
    const sub: unknown = JSON.parse(new TextDecoder().decode(bytes)).sub;
    return typeof sub === "string" ? sub : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Whose things the tab keeps (intents, holds, places in line): one key per `sub`, so
 * a buyer who signs in as someone else in the same tab never resumes or replays what
 * the previous one started, and finds their own again when back.
 */
export function buyerKey(token: string | undefined): string {
  const name = token && buyerName(token);
  return name ? `buyer-${encodeURIComponent(name)}` : "anonymous";
}

const sentAt = new Map<string, number>();

api.use({
  onRequest({ request, id }) {
    if (signedIn) request.headers.set("Authorization", `Bearer ${signedIn}`);
    sentAt.set(id, Date.now());
    return request;
  },
  onResponse({ response, id }) {
    noteServerTime(response, sentAt.get(id) ?? Date.now());
    sentAt.delete(id);
    return response;
  },
});

// Hold expiry and queue opening are the server's times: count down against its
// clock, not the device's. Each answer's Date header (whole seconds) bounds the
// difference: the server read its clock, somewhere in [Date, Date + 1 s), between our
// sending and our receiving. Every answer narrows the bounds; their middle is used.
let low = -Infinity;
let high = Infinity;

function noteServerTime(response: Response, sent: number) {
  const date = Date.parse(response.headers.get("date") ?? "");
  if (Number.isNaN(date)) return;
  const received = Date.now();
  const [l, h] = [date - received, date + 1000 - sent];
  // Bounds that no longer overlap mean a clock was set: start again from this answer.
  if (l > high || h < low) [low, high] = [l, h];
  else [low, high] = [Math.max(low, l), Math.min(high, h)];
}

export function serverNow(): number {
  return Number.isFinite(low) ? Date.now() + (low + high) / 2 : Date.now();
}

/** What one call came to: an answer the server stands by, or none we can trust. */
export type Outcome<T> =
  | { kind: "ok"; data: T; response: Response }
  | { kind: "refused"; status: number; error: ErrorBody }
  | { kind: "unknown"; reason: string };

/** What an openapi-fetch call resolves to. */
export type Answer<T> = { data?: T; error?: unknown; response: Response };

/**
 * Runs `call` until the server gives a definite answer, at most `attempts` times.
 * No answer, a timeout, 429 or a 5xx leaves the outcome unknown: the call is sent
 * again as it was — with the same Idempotency-Key, so a sale the lost answer made is
 * replayed, never made twice.
 */
export async function untilAnswered<T>(call: () => Promise<Answer<T>>, attempts = 4): Promise<Outcome<T>> {
  let last: Outcome<T> = { kind: "unknown", reason: "not sent" };
  for (let attempt = 0; attempt < attempts; attempt++) {
    if (attempt > 0) await sleep(400 * 2 ** (attempt - 1) * (0.5 + Math.random()));
    let answer: Answer<T>;
    try {
      answer = await call();
    } catch (e) {
      last = { kind: "unknown", reason: e instanceof Error ? e.message : String(e) };
      continue;
    }
    const { status } = answer.response;
    // A 204 has no body: `data` is then undefined, which `T` says (e.g. `never`).
    if (answer.response.ok) return { kind: "ok", data: answer.data as T, response: answer.response };
    if (status === 408 || status === 429 || status >= 500) {
      last = { kind: "unknown", reason: `HTTP ${status}` };
      continue;
    }
    return { kind: "refused", status, error: asErrorBody(answer.error, status) };
  }
  return last;
}

function asErrorBody(error: unknown, status: number): ErrorBody {
  if (error && typeof error === "object" && "error" in error && "message" in error) return error as ErrorBody;
  return { error: "INTERNAL_ERROR", message: `HTTP ${status}` };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// One Idempotency-Key per intended purchase. A buyer's click becomes an intent (what
// and how many, and a fresh key); every retry of it — after a lost answer, a second
// click, a reload — sends that same intent, so the server sells it at most once. Only
// a definite answer settles it and lets the next click be a new intent. Intents are
// kept per buyer (`buyerKey`): one buyer's is never sent under another's token.

export type IntentKind = "purchase" | "hold";

export interface Intent {
  kind: IntentKind;
  buyer: string;
  eventId: string;
  quantity: number;
  key: string;
}

const storageKey = (buyer: string, eventId: string) => `boxoffice.intent.${buyer}.${eventId}`;

/** The buyer's intent still waiting for a definite answer on this event, if any. */
export function pendingIntent(buyer: string, eventId: string): Intent | undefined {
  const stored = sessionStorage.getItem(storageKey(buyer, eventId));
  if (!stored) return undefined;
  try {
    const intent = JSON.parse(stored) as Intent;
    if (intent.buyer === buyer && intent.eventId === eventId && typeof intent.key === "string") return intent;
  } catch {
    // unreadable: treated as none
  }
  sessionStorage.removeItem(storageKey(buyer, eventId));
  return undefined;
}

/**
 * The intent a click stands for: the pending one while there is one (whatever the
 * form now says), otherwise a new one with a new key, kept until it is settled.
 */
export function intentFor(kind: IntentKind, buyer: string, eventId: string, quantity: number): Intent {
  const pending = pendingIntent(buyer, eventId);
  if (pending) return pending;
  const intent: Intent = { kind, buyer, eventId, quantity, key: newKey() };
  sessionStorage.setItem(storageKey(buyer, eventId), JSON.stringify(intent));
  return intent;
}

/** The server answered this intent for good (sold, held or refused). */
export function settle(intent: Intent) {
  if (pendingIntent(intent.buyer, intent.eventId)?.key === intent.key) {
    sessionStorage.removeItem(storageKey(intent.buyer, intent.eventId));
  }
}

/**
 * A random UUID (v4). `crypto.randomUUID` exists only on HTTPS or localhost; the page
 * may be opened over plain HTTP on a LAN, where `getRandomValues` still works.
 */
function newKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

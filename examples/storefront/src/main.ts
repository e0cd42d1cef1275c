// The buyer's page: one event, its seats (kept up to date while the page is open),
// buying or holding, a hold's countdown, the waiting room of a queued event, and the
// question a sign-in link asks before it changes who is buying.

import "./style.css";
import { adoptToken, api, buyerKey, buyerName, serverNow, signedIn, tokenFromLink, untilAnswered } from "./client";
import type { Answer, Event, HoldCreated, Outcome, PurchaseOk, QueueStatus } from "./client";
import { intentFor, pendingIntent, settle } from "./intent";
import type { Intent } from "./intent";
import { buyerWords, stillTrying } from "./words";

const REFRESH_MS = 2000;

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`#${id} missing from index.html`);
  return element as T;
}

const ui = {
  signIn: $("sign-in"),
  signInQuestion: $("sign-in-question"),
  signInHint: $("sign-in-hint"),
  accept: $<HTMLButtonElement>("accept"),
  keep: $<HTMLButtonElement>("keep"),
  decline: $<HTMLButtonElement>("decline"),
  loading: $("loading"),
  picker: $("picker"),
  eventList: $("event-list"),
  event: $("event"),
  name: $("event-name"),
  availability: $("availability"),
  who: $("who"),
  queue: $("queue"),
  queueText: $("queue-text"),
  join: $<HTMLButtonElement>("join"),
  order: $<HTMLFormElement>("order"),
  quantity: $<HTMLSelectElement>("quantity"),
  buy: $<HTMLButtonElement>("buy"),
  hold: $<HTMLButtonElement>("hold"),
  orderHint: $("order-hint"),
  held: $("held"),
  heldCount: $("held-count"),
  countdown: $("countdown"),
  confirm: $<HTMLButtonElement>("confirm"),
  release: $<HTMLButtonElement>("release"),
  receipt: $("receipt"),
  receiptText: $("receipt-text"),
  again: $<HTMLButtonElement>("again"),
  status: $("status"),
  problem: $("problem"),
};

interface Held {
  holdId: string;
  quantity: number;
  expiresAt: number;
}

interface Admission {
  token: string;
  expiresAt: number;
}

const state: {
  event?: Event;
  token?: string;
  /** Whose intents, hold and place in line are kept (`buyerKey`). */
  buyer: string;
  busy: boolean;
  held?: Held;
  receipt?: PurchaseOk;
  ticket?: string;
  queue?: QueueStatus;
  admission?: Admission;
} = { busy: false, token: signedIn, buyer: buyerKey(signedIn) };

// ---------------------------------------------------------------- rendering

const tickets = (n: number) => `${n} ticket${n === 1 ? "" : "s"}`;
const clock = (ms: number) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

function minutes(seconds: number): string {
  if (seconds < 120) return `${seconds} seconds`;
  return `${Math.round(seconds / 60)} minutes`;
}

function say(message: string) {
  ui.status.textContent = message;
  ui.problem.textContent = "";
}

function complain(message: string) {
  ui.problem.textContent = message;
  ui.status.textContent = "";
}

function queued(): boolean {
  return state.event?.queue !== undefined;
}

function admitted(): boolean {
  return state.admission !== undefined && state.admission.expiresAt > serverNow();
}

function render() {
  const event = state.event;
  if (!event) return;
  document.title = `${event.name} · Tickets`;
  ui.name.textContent = event.name;
  const pending = pendingIntent(state.buyer, event.id);

  if (event.seatsRemaining > 0) {
    ui.availability.textContent = `${event.seatsRemaining} of ${event.totalSeats} seats left`;
    ui.availability.className = "availability";
  } else {
    ui.availability.textContent =
      event.seatsHeld > 0
        ? `Sold out for now: ${event.seatsHeld} seats are held by other buyers and may come back.`
        : "Sold out";
    ui.availability.className = "availability sold-out";
  }

  ui.held.hidden = state.held === undefined;
  ui.receipt.hidden = state.receipt === undefined;
  renderQueue();

  const mayOrder = !queued() || admitted();
  ui.order.hidden = state.held !== undefined || state.receipt !== undefined || !mayOrder || (event.seatsRemaining === 0 && !pending);

  const most = Math.max(1, Math.min(10, event.seatsRemaining, event.maxPerBuyer ?? 10));
  const chosen = pending?.quantity ?? Number(ui.quantity.value || 1);
  if (ui.quantity.options.length !== most) {
    ui.quantity.replaceChildren(
      ...Array.from({ length: most }, (_, i) => new Option(String(i + 1), String(i + 1))),
    );
  }
  ui.quantity.value = String(Math.min(chosen, most));
  // An order whose answer was lost is retried as it was: its quantity is fixed.
  ui.quantity.disabled = state.busy || pending !== undefined;
  ui.buy.textContent = pending?.kind === "purchase" ? "Try again" : "Buy now";
  ui.hold.textContent = pending?.kind === "hold" ? "Try again" : `Hold for ${minutes(event.holdSeconds)}`;
  ui.buy.hidden = pending?.kind === "hold";
  ui.hold.hidden = pending?.kind === "purchase";
  for (const button of [ui.buy, ui.hold, ui.confirm, ui.release, ui.join]) {
    button.disabled = state.busy;
    button.setAttribute("aria-busy", String(state.busy));
  }
  ui.orderHint.textContent = !event.maxPerBuyer
    ? ""
    : state.token
      ? `At most ${tickets(event.maxPerBuyer)} per buyer.`
      : `Please sign in to buy: at most ${tickets(event.maxPerBuyer)} per buyer.`;
}

function renderQueue() {
  ui.queue.hidden = !queued();
  const room = state.event?.queue;
  if (!room) return;
  ui.join.hidden = state.ticket !== undefined || !state.token;
  const status = state.queue;
  if (!state.token) {
    ui.queueText.textContent = "This sale has a waiting room. Please sign in to join it.";
  } else if (admitted() && state.admission) {
    ui.queueText.textContent = `It is your turn. You can buy until ${clock(state.admission.expiresAt)}.`;
  } else if (status?.admitted) {
    ui.queueText.textContent = "Your turn has ended. Thank you for waiting.";
  } else if (status && serverNow() < Date.parse(status.opensAt)) {
    ui.queueText.textContent =
      `You are in. The sale opens at ${clock(Date.parse(status.opensAt))}; ` +
      `everyone who joined before then (${status.position ?? 1} so far) gets a random place in line.`;
  } else if (status) {
    const wait = status.estimatedWaitSeconds ?? 0;
    ui.queueText.textContent =
      `You are number ${status.position ?? 1} in line. ` +
      (wait > 0 ? `About ${minutes(wait)} to go. ` : "") +
      "Keep this page open: it lets you in when it is your turn.";
  } else {
    const opens = Date.parse(room.opensAt);
    ui.queueText.textContent =
      serverNow() < opens
        ? `The sale opens at ${clock(opens)}. Join now: everyone who joins before then gets a random place in line.`
        : "The sale is open. Join the queue: buyers are let in a few at a time, in the order they joined.";
  }
}

// ---------------------------------------------------------------- the event

async function refresh() {
  if (!state.event) return;
  const id = state.event.id;
  try {
    const { data } = await api.GET("/api/v1/events/{id}", { params: { path: { id } } });
    if (data && data.id === state.event?.id) state.event = data;
  } catch {
    // offline for a moment: the next refresh tries again
  }
  render();
}

function keepFresh() {
  setInterval(() => {
    if (document.visibilityState === "visible") void refresh();
  }, REFRESH_MS);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") void refresh();
  });
}

// ---------------------------------------------------------------- buying and holding

// Per buyer and event: another buyer in this tab finds none of them (see `buyerKey`).
const stored = {
  get<T>(name: string): T | undefined {
    const value = state.event && sessionStorage.getItem(`boxoffice.${name}.${state.buyer}.${state.event.id}`);
    return value ? (JSON.parse(value) as T) : undefined;
  },
  set(name: string, value: unknown) {
    if (!state.event) return;
    const key = `boxoffice.${name}.${state.buyer}.${state.event.id}`;
    if (value === undefined) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, JSON.stringify(value));
  },
};

/**
 * Sends `call` until answered (`untilAnswered`), one request at a time: the page's
 * controls are disabled meanwhile, so a second click has nothing to press.
 */
async function exclusively<T>(call: () => Promise<Answer<T>>): Promise<Outcome<T>> {
  state.busy = true;
  render();
  try {
    return await untilAnswered(call);
  } finally {
    state.busy = false;
  }
}

/** Sends an intent until answered, then shows what it came to. */
async function send(intent: Intent) {
  if (state.busy) return;
  say(`${intent.kind === "purchase" ? "Buying" : "Holding"} ${tickets(intent.quantity)}…`);
  const headers = {
    "Idempotency-Key": intent.key,
    ...(state.admission ? { "Admission-Token": state.admission.token } : {}),
  };
  const params = { path: { id: intent.eventId }, header: headers };
  const body = { quantity: intent.quantity };
  const started = Date.now();
  const outcome = await exclusively<PurchaseOk | HoldCreated>(() =>
    intent.kind === "purchase"
      ? api.POST("/api/v1/events/{id}/purchase", { params, body })
      : api.POST("/api/v1/events/{id}/holds", { params, body }),
  );
  if (outcome.kind === "unknown") {
    complain(stillTrying);
  } else if (outcome.kind === "refused" && outcome.status === 401) {
    // Refused before the server looked at the key: an earlier attempt's sale may
    // stand. The order is kept, and sent again with its key once signed in anew.
    complain(buyerWords(outcome.error, state.event));
  } else {
    settle(intent);
    if (outcome.kind === "ok" && intent.kind === "purchase") {
      showReceipt(outcome.data as PurchaseOk);
    } else if (outcome.kind === "ok") {
      const hold = outcome.data as HoldCreated;
      // Never later than the hold's length after we asked, whatever the clocks say.
      const expiresAt = Math.min(Date.parse(hold.expiresAt), serverNow() - Date.now() + started + (state.event?.holdSeconds ?? 0) * 1000);
      state.held = { holdId: hold.holdId, quantity: hold.quantity, expiresAt };
      stored.set("hold", state.held);
      say(`${tickets(hold.quantity)} held for you until ${clock(state.held.expiresAt)}.`);
      tick();
      ui.held.focus();
    } else {
      if (outcome.error.error === "ADMISSION_REQUIRED") dropAdmission();
      await refresh();
      complain(buyerWords(outcome.error, state.event));
    }
  }
  void refresh();
}

function showReceipt(sale: PurchaseOk) {
  state.receipt = sale;
  state.held = undefined;
  stored.set("hold", undefined);
  ui.receiptText.textContent = `${tickets(sale.quantity)} bought. Your order number is ${sale.purchaseId}.`;
  say(`Done: ${tickets(sale.quantity)} bought.`);
  render();
  ui.receipt.focus();
}

ui.order.addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.event || state.busy) return;
  void send(intentFor("purchase", state.buyer, state.event.id, Number(ui.quantity.value)));
});

ui.hold.addEventListener("click", () => {
  if (!state.event || state.busy) return;
  void send(intentFor("hold", state.buyer, state.event.id, Number(ui.quantity.value)));
});

ui.again.addEventListener("click", () => {
  state.receipt = undefined;
  say("");
  render();
  ui.quantity.focus();
});

// ---------------------------------------------------------------- a hold's life

let ticking: number | undefined;

/** Counts the hold down to its expiry (server time), then asks how it ended. */
function tick() {
  clearTimeout(ticking);
  const held = state.held;
  if (!held) return;
  const left = Math.ceil((held.expiresAt - serverNow()) / 1000);
  if (left > 0) {
    ui.heldCount.textContent = `${tickets(held.quantity)} held`;
    ui.countdown.textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    render();
    ticking = window.setTimeout(tick, 1000 - ((held.expiresAt - serverNow()) % 1000));
    return;
  }
  void checkHold(held);
}

async function checkHold(held: Held) {
  const id = state.event?.id;
  if (!id) return;
  const outcome = await untilAnswered(() =>
    api.GET("/api/v1/events/{id}/holds/{holdId}", { params: { path: { id, holdId: held.holdId } } }),
  );
  if (outcome.kind === "ok" && outcome.data.state === "held") {
    // The server's clock is a moment behind ours: look again shortly.
    ticking = window.setTimeout(() => void checkHold(held), 500);
    return;
  }
  if (outcome.kind === "unknown") {
    ticking = window.setTimeout(() => void checkHold(held), 2000);
    return;
  }
  forgetHold();
  if (outcome.kind === "refused") complain(buyerWords(outcome.error, state.event));
  else if (outcome.data.state === "confirmed") say(`These ${tickets(held.quantity)} were bought.`);
  else if (outcome.data.state === "released") say("Released. The seats are back on sale.");
  else complain(buyerWords({ error: "HOLD_EXPIRED", message: "" }, state.event));
  await refresh();
}

function forgetHold() {
  clearTimeout(ticking);
  state.held = undefined;
  stored.set("hold", undefined);
  render();
}

ui.confirm.addEventListener("click", async () => {
  const held = state.held;
  const id = state.event?.id;
  if (!held || !id || state.busy) return;
  say(`Buying ${tickets(held.quantity)}…`);
  // Confirming is idempotent by the hold's id: a retry returns the same sale.
  const outcome = await exclusively(() =>
    api.POST("/api/v1/events/{id}/holds/{holdId}/confirm", { params: { path: { id, holdId: held.holdId } } }),
  );
  if (outcome.kind === "ok") showReceipt(outcome.data);
  else if (outcome.kind === "unknown") complain(stillTrying);
  else {
    forgetHold();
    complain(buyerWords(outcome.error, state.event));
  }
  await refresh();
});

ui.release.addEventListener("click", async () => {
  const held = state.held;
  const id = state.event?.id;
  if (!held || !id || state.busy) return;
  const outcome = await exclusively(() =>
    api.DELETE("/api/v1/events/{id}/holds/{holdId}", { params: { path: { id, holdId: held.holdId } } }),
  );
  if (outcome.kind === "unknown") complain(stillTrying);
  else if (outcome.kind === "ok") {
    forgetHold();
    say("Released. The seats are back on sale.");
  } else {
    forgetHold();
    complain(buyerWords(outcome.error, state.event));
  }
  await refresh();
});

// ---------------------------------------------------------------- the waiting room

let polling: number | undefined;

function applyQueue(status: QueueStatus) {
  state.queue = status;
  state.ticket = status.ticket;
  stored.set("ticket", status.ticket);
  clearTimeout(polling);
  if (status.admitted && status.admissionToken && status.expiresAt) {
    const wasAdmitted = admitted();
    state.admission = { token: status.admissionToken, expiresAt: Date.parse(status.expiresAt) };
    if (!wasAdmitted && admitted()) {
      say(`It is your turn. You can buy until ${clock(state.admission.expiresAt)}.`);
      resumePending();
    }
    // The order form goes away when the admission ends.
    polling = window.setTimeout(render, Math.max(0, state.admission.expiresAt - serverNow()) + 100);
  } else if (!status.admitted) {
    polling = window.setTimeout(() => void poll(), status.pollAfterMs ?? 2000);
  }
  render();
}

function dropAdmission() {
  state.admission = undefined;
  if (state.ticket) void poll();
}

async function poll() {
  const id = state.event?.id;
  const ticket = state.ticket;
  if (!id || !ticket) return;
  const outcome = await untilAnswered(() =>
    api.GET("/api/v1/events/{id}/queue/{ticket}", { params: { path: { id, ticket } } }),
  );
  if (outcome.kind === "ok") applyQueue(outcome.data);
  else if (outcome.kind === "refused") {
    // Redis lost the waiting room, or the ticket is not this buyer's: join again.
    state.ticket = undefined;
    state.queue = undefined;
    stored.set("ticket", undefined);
    complain(outcome.error.error === "TICKET_NOT_FOUND" ? "Your place in line was lost. Please join again." : buyerWords(outcome.error, state.event));
    render();
  } else {
    polling = window.setTimeout(() => void poll(), 5000);
  }
}

ui.join.addEventListener("click", async () => {
  const id = state.event?.id;
  if (!id || state.busy) return;
  // Joining twice returns the same ticket, so a retry is harmless.
  const outcome = await exclusively(() => api.POST("/api/v1/events/{id}/queue", { params: { path: { id } } }));
  if (outcome.kind === "ok") {
    say("You are in the queue.");
    applyQueue(outcome.data);
  } else if (outcome.kind === "unknown") complain(stillTrying);
  else complain(buyerWords(outcome.error, state.event));
  render();
});

// ---------------------------------------------------------------- signing in

let offered: string | undefined;
let asking: Promise<void> | undefined;
let kept: (() => void) | undefined;

/**
 * A token from a link (`tokenFromLink`) is only signed in with once the buyer says
 * so: the link may be someone else's, made to have this buyer buy as them. Every
 * token but the one in use is asked about, a first one too (nothing tells the site's
 * hand-over from a forged link), by the name it carries. Accepting loads the page
 * again as that buyer (`adoptToken`); the promise is kept when the buyer stays who
 * they were.
 */
function offerFromLink(): Promise<void> | undefined {
  const token = tokenFromLink();
  // A token without a name (`sub`) signs no one in: the server refuses it.
  const name = token && buyerName(token);
  if (!token || !name || token === state.token) return asking;
  offered = token;
  const current = state.token && buyerName(state.token);
  ui.signInQuestion.textContent = `Sign in as ${name}?`;
  ui.signInHint.textContent =
    (current ? `You are signed in as ${current}. ` : "") +
    "Accept only a sign-in you have just made yourself: with someone else's, you would buy as them.";
  ui.keep.hidden = state.token === undefined;
  ui.decline.hidden = state.token !== undefined;
  ui.signIn.hidden = false;
  ui.signIn.focus();
  asking ??= new Promise((resolve) => (kept = resolve));
  return asking;
}

ui.accept.addEventListener("click", () => {
  if (offered) adoptToken(offered);
});

for (const button of [ui.keep, ui.decline]) {
  button.addEventListener("click", () => {
    offered = undefined;
    asking = undefined;
    ui.signIn.hidden = true;
    say("The sign-in from the link was not used.");
    kept?.();
  });
}

// A link followed while the page is open changes only the fragment.
window.addEventListener("hashchange", () => void offerFromLink());

// ---------------------------------------------------------------- start

async function pickEvent(): Promise<string | undefined> {
  const chosen = new URLSearchParams(location.search).get("event");
  if (chosen) return chosen;
  const outcome = await untilAnswered(() => api.GET("/api/v1/events"));
  if (outcome.kind !== "ok") {
    ui.loading.textContent = "The box office is not answering. Please reload the page in a moment.";
    return undefined;
  }
  const open = outcome.data;
  if (open.length === 1) return open[0].id;
  ui.loading.hidden = true;
  ui.picker.hidden = false;
  if (open.length === 0) ui.eventList.replaceChildren(Object.assign(document.createElement("li"), { textContent: "Nothing is on sale right now." }));
  for (const event of open) {
    const link = Object.assign(document.createElement("a"), { href: `?event=${event.id}`, textContent: event.name });
    const item = document.createElement("li");
    item.append(link, ` (${event.seatsRemaining > 0 ? `${event.seatsRemaining} seats left` : "sold out"})`);
    ui.eventList.append(item);
  }
  return undefined;
}

async function start() {
  const who = state.token && buyerName(state.token);
  ui.who.textContent = who ? `Signed in as ${who}` : "";
  // Nothing is loaded or sent until the buyer has said who they are.
  const asked = offerFromLink();
  if (asked) {
    ui.loading.hidden = true;
    await asked;
    ui.loading.hidden = false;
  }
  const id = await pickEvent();
  if (!id) return;
  const outcome = await untilAnswered(() => api.GET("/api/v1/events/{id}", { params: { path: { id } } }));
  if (outcome.kind !== "ok") {
    ui.loading.textContent =
      outcome.kind === "refused" ? buyerWords(outcome.error) : "The box office is not answering. Please reload the page in a moment.";
    return;
  }
  state.event = outcome.data;
  ui.loading.hidden = true;
  ui.event.hidden = false;
  state.held = stored.get<Held>("hold");
  state.ticket = stored.get<string>("ticket");
  render();
  keepFresh();
  if (state.held) tick();
  if (state.ticket && queued()) void poll();
  // On a queued event it waits for the admission (see `applyQueue`).
  resumePending();
}

/** A click whose answer was lost (the page closed or went offline): finish it. */
function resumePending() {
  const pending = state.event && pendingIntent(state.buyer, state.event.id);
  if (pending && (!queued() || admitted())) void send(pending);
}

void start();

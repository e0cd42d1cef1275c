//! The reference model: what the service has promised so far, built only from its
//! answers, and the checks every later answer, and the books at the end, must pass.
//!
//! Uncertainty is explicit. A request that got no answer, or a 503, may or may not
//! have been decided: it is *pending* until a retry with the same key (or hold, or
//! sale) settles it. Seat counts are checked against bounds that pending requests
//! widen. A refusal keeps nothing (docs/api.md): a retry of a refused key is decided
//! anew and is never marked replayed. A data-loss fault starts a new *epoch*: tickets
//! of the waiting room may be gone; nothing else may change.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use uuid::Uuid;

/// Leeway between this process' clock and Redis' (one machine) for expiry checks.
pub const CLOCK_MARGIN_MS: i64 = 150;
/// The replicas' `BOXOFFICE_ENDED_HOLD_TTL`: a hold that ended without a sale, and
/// its key, may be forgotten this long after it ended (a confirmed one is kept).
pub const ENDED_HOLD_TTL_MS: i64 = 2_000;

/// An answer as the client saw it; `status` is `None` when none arrived.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: Option<u16>,
    pub body: String,
    pub json: Value,
    pub replayed: bool,
    /// When the request was sent and when its answer arrived (Unix ms).
    pub sent_ms: i64,
    pub received_ms: i64,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.json["error"].as_str().unwrap_or("")
    }

    /// No answer, or one that says nothing was decided for certain.
    fn indefinite(&self) -> bool {
        matches!(self.status, None | Some(503) | Some(408))
    }

    fn time_ms(&self, field: &str) -> Option<i64> {
        let text = self.json[field].as_str()?;
        Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()?
                .timestamp_millis(),
        )
    }

    fn id(&self, field: &str) -> Option<Uuid> {
        self.json[field].as_str()?.parse().ok()
    }
}

#[derive(Debug, Clone)]
pub struct EventModel {
    pub id: Uuid,
    pub total: i64,
    pub limit: Option<i64>,
    /// Admissions per second, for a queued event.
    pub rate: Option<u32>,
}

/// A purchase or hold request, as first sent under its key; retries send it again.
#[derive(Debug, Clone)]
pub struct KeyModel {
    pub event: usize,
    pub hold: bool,
    pub quantity: u8,
    pub buyer: Option<usize>,
    /// The admission token sent with it, and when that token expires (Unix ms).
    pub admission: Option<(String, i64)>,
    /// What the key's last decision answered (status, body): its sale or hold, or the
    /// latest refusal.
    pub decided: Option<(u16, String)>,
    pub pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKnown {
    Live,
    Confirmed,
    Released,
    Expired,
}

#[derive(Debug, Clone)]
pub struct HoldModel {
    pub event: usize,
    pub quantity: u8,
    pub buyer: Option<usize>,
    pub expires_ms: i64,
    pub state: HoldKnown,
    pub confirm_pending: bool,
    pub release_pending: bool,
    /// When the first release was sent: the earliest the hold may have ended.
    pub first_release_ms: Option<i64>,
    /// The first confirmation's body: every later one replays it.
    pub sale_body: Option<String>,
}

impl HoldModel {
    /// Whether Redis may have forgotten it by `now_ms`: it was never confirmed (a
    /// confirmed hold is kept as long as a sale) and ended, by its expiry or its
    /// release, the ended-hold TTL ago.
    fn may_be_forgotten(&self, now_ms: i64) -> bool {
        let ended = self
            .first_release_ms
            .map_or(self.expires_ms, |r| r.min(self.expires_ms));
        self.state != HoldKnown::Confirmed && now_ms + CLOCK_MARGIN_MS >= ended + ENDED_HOLD_TTL_MS
    }

    /// Known forgotten: it ended without a sale (a confirmation still pending did
    /// not sell, or the hold would be kept).
    fn forget(&mut self) {
        if self.state == HoldKnown::Live {
            self.state = if self.release_pending {
                HoldKnown::Released
            } else {
                HoldKnown::Expired
            };
        }
        self.confirm_pending = false;
        self.release_pending = false;
    }
}

#[derive(Debug, Clone)]
pub struct SaleModel {
    pub event: usize,
    pub key: String,
    pub quantity: u8,
    pub buyer: Option<usize>,
    pub via_hold: bool,
    /// The first cancellation's body and its `cancelledAt`.
    pub cancelled: Option<(String, String)>,
    pub cancel_pending: bool,
}

/// A buyer's place in a queued event's waiting room.
#[derive(Debug, Clone)]
pub struct TicketModel {
    pub ticket: String,
    pub epoch: u32,
    pub joined_ms: i64,
    /// The admission token and when it expires (Unix ms).
    pub admission: Option<(String, i64)>,
    /// The service said its admission expired unused (`admissionExpired`): joining
    /// again gives a place at the back. Also after a room came back from a snapshot
    /// taken while it was admitted, whose token this run never saw.
    pub spent: bool,
}

#[derive(Default)]
pub struct Reference {
    pub events: Vec<EventModel>,
    pub keys: BTreeMap<String, KeyModel>,
    pub holds: BTreeMap<Uuid, HoldModel>,
    pub sales: BTreeMap<Uuid, SaleModel>,
    pub tickets: BTreeMap<(usize, usize), TicketModel>,
    /// When each ticket a buyer was ever given was first joined for: Redis may hand
    /// an old one back from a snapshot.
    pub joined: BTreeMap<(usize, usize, String), i64>,
    /// Admission moments seen, per event and epoch, by ticket.
    pub admissions: BTreeMap<(usize, u32), BTreeMap<String, i64>>,
    pub epoch: u32,
    pub violation: Option<String>,
    /// Answers that found a hold forgotten (see [`HoldModel::may_be_forgotten`]).
    pub forgotten: usize,
}

impl Reference {
    fn violate(&mut self, what: String) {
        self.violation.get_or_insert(what);
    }

    /// The answer to a purchase or hold under `key` (first or retried).
    pub fn purchase_answered(&mut self, key: &str, answer: &Answer) {
        let k = self.keys[key].clone();
        if answer.indefinite() {
            self.keys.get_mut(key).unwrap().pending = true;
            return;
        }
        let status = answer.status.unwrap();
        let ok = if k.hold { 201 } else { 200 };
        match status {
            s if s == ok || s == 409 => {}
            403 if answer.code() == "ADMISSION_REQUIRED" => {
                let queued = self.events[k.event].rate.is_some();
                let valid = k
                    .admission
                    .as_ref()
                    .is_some_and(|(_, expires)| *expires > answer.sent_ms + 1_000);
                // A recorded decision replays before admission is looked at; a
                // refusal is not recorded.
                let replays = k.decided.as_ref().is_some_and(|(status, _)| *status != 409);
                if !queued || valid || replays {
                    self.violate(format!(
                        "{key}: ADMISSION_REQUIRED (queued {queued}, valid admission {valid}, \
                         decided {:?})",
                        k.decided
                    ));
                }
                self.keys.get_mut(key).unwrap().pending = false;
                return;
            }
            401 if answer.code() == "BUYER_TOKEN_REQUIRED" => {
                if k.buyer.is_some() || self.events[k.event].limit.is_none() {
                    self.violate(format!("{key}: BUYER_TOKEN_REQUIRED: {}", answer.body));
                }
                self.keys.get_mut(key).unwrap().pending = false;
                return;
            }
            _ => {
                self.violate(format!("{key}: unexpected {status} {}", answer.body));
                return;
            }
        }
        if status == 409 && answer.replayed {
            return self.violate(format!("{key}: a refusal was kept and replayed"));
        }
        if let Some((first_status, first_body)) = &k.decided {
            let refused = *first_status == 409;
            if *first_status == status && *first_body == answer.body {
                if !answer.replayed && !refused {
                    self.violate(format!("{key}: a replay without Idempotent-Replayed"));
                }
                self.keys.get_mut(key).unwrap().pending = false;
                return;
            }
            let forgotten =
                k.hold && !answer.replayed && self.hold_forgotten(first_body, answer.sent_ms);
            if !refused && !forgotten {
                self.violate(format!(
                    "{key}: first answered {first_status} {first_body}, now {status} {}",
                    answer.body
                ));
                return;
            }
        } else if answer.replayed && !k.pending {
            self.violate(format!(
                "{key}: replayed before it was ever decided: {}",
                answer.body
            ));
        }
        {
            let k = self.keys.get_mut(key).unwrap();
            // A refusal after a hold was forgotten is not recorded either: Redis
            // restored from a snapshot still within the hold's time replays it.
            if !(status == 409 && k.decided.as_ref().is_some_and(|(s, _)| *s == 201)) {
                k.decided = Some((status, answer.body.clone()));
            }
            k.pending = false;
        }
        if status == 409 {
            let code = answer.code();
            if code != "SOLD_OUT" && code != "BUYER_LIMIT" {
                self.violate(format!("{key}: 409 {}", answer.body));
            }
            return;
        }
        if answer.json["quantity"].as_u64() != Some(u64::from(k.quantity)) {
            self.violate(format!("{key}: asked {} got {}", k.quantity, answer.body));
        }
        if answer.json["seatsRemaining"].as_i64().is_none_or(|r| r < 0) {
            self.violate(format!("{key}: seatsRemaining {}", answer.body));
        }
        if k.hold {
            let (Some(id), Some(expires_ms)) = (answer.id("holdId"), answer.time_ms("expiresAt"))
            else {
                return self.violate(format!("{key}: hold answer {}", answer.body));
            };
            if self.holds.contains_key(&id) {
                return self.violate(format!("{key}: hold {id} made twice"));
            }
            self.holds.insert(
                id,
                HoldModel {
                    event: k.event,
                    quantity: k.quantity,
                    buyer: k.buyer,
                    expires_ms,
                    state: HoldKnown::Live,
                    confirm_pending: false,
                    release_pending: false,
                    first_release_ms: None,
                    sale_body: None,
                },
            );
        } else {
            let Some(id) = answer.id("purchaseId") else {
                return self.violate(format!("{key}: sale answer {}", answer.body));
            };
            self.new_sale(id, k.event, key.to_owned(), k.quantity, k.buyer, false);
        }
        self.check_buyer(k.event, k.buyer, answer.received_ms);
    }

    fn new_sale(
        &mut self,
        id: Uuid,
        event: usize,
        key: String,
        quantity: u8,
        buyer: Option<usize>,
        via_hold: bool,
    ) {
        if self.sales.contains_key(&id) {
            return self.violate(format!("sale {id} made twice"));
        }
        self.sales.insert(
            id,
            SaleModel {
                event,
                key,
                quantity,
                buyer,
                via_hold,
                cancelled: None,
                cancel_pending: false,
            },
        );
    }

    /// No buyer has more seats than the event allows: what is known for certain of
    /// their sales and live holds.
    fn check_buyer(&mut self, event: usize, buyer: Option<usize>, now_ms: i64) {
        let (Some(limit), Some(buyer)) = (self.events[event].limit, buyer) else {
            return;
        };
        let sold: i64 = self
            .sales
            .values()
            .filter(|s| s.event == event && s.buyer == Some(buyer) && s.cancelled.is_none())
            .map(|s| i64::from(s.quantity))
            .sum();
        let held: i64 = self
            .holds
            .values()
            .filter(|h| h.event == event && h.buyer == Some(buyer) && h.state == HoldKnown::Live)
            .filter(|h| h.expires_ms > now_ms + CLOCK_MARGIN_MS)
            .map(|h| i64::from(h.quantity))
            .sum();
        if sold + held > limit {
            self.violate(format!(
                "buyer {buyer} of event {event}: {sold} sold + {held} held > limit {limit}"
            ));
        }
    }

    /// Whether `key` made a hold that Redis may have forgotten, key and all, by
    /// `now_ms`.
    pub fn hold_key_may_be_forgotten(&self, key: &str, now_ms: i64) -> bool {
        let k = &self.keys[key];
        let id = k.decided.as_ref().and_then(|(_, body)| {
            let body: Value = serde_json::from_str(body).ok()?;
            body["holdId"].as_str()?.parse::<Uuid>().ok()
        });
        k.hold
            && id
                .and_then(|id| self.holds.get(&id))
                .is_some_and(|h| h.may_be_forgotten(now_ms))
    }

    /// Whether the hold `first_body` (a hold's answer) names may be forgotten by
    /// `now_ms`, its key with it: a retry of the key may then make a new hold. The
    /// old one is ended, whatever the model had.
    fn hold_forgotten(&mut self, first_body: &str, now_ms: i64) -> bool {
        let id = serde_json::from_str::<Value>(first_body)
            .ok()
            .and_then(|b| b["holdId"].as_str().and_then(|id| id.parse::<Uuid>().ok()));
        let Some(hold) = id.and_then(|id| self.holds.get_mut(&id)) else {
            return false;
        };
        if !hold.may_be_forgotten(now_ms) {
            return false;
        }
        hold.forget();
        self.forgotten += 1;
        true
    }

    /// A hold Redis no longer knows (404): lawful only once it may be forgotten.
    fn hold_not_found(&mut self, hold: Uuid, what: &str, answer: &Answer) {
        let h = self.holds.get_mut(&hold).unwrap();
        if !h.may_be_forgotten(answer.sent_ms) {
            let state = (h.state, h.expires_ms, h.first_release_ms);
            return self.violate(format!(
                "{what} {hold} (state, expiry, first release {state:?}): {} at {}",
                answer.body, answer.sent_ms
            ));
        }
        h.forget();
        self.forgotten += 1;
    }

    /// A confirmation's answer.
    pub fn confirm_answered(&mut self, hold: Uuid, answer: &Answer) {
        let h = self.holds[&hold].clone();
        if answer.indefinite() {
            self.holds.get_mut(&hold).unwrap().confirm_pending = true;
            return;
        }
        match answer.status {
            Some(200) => {
                if answer.id("purchaseId") != Some(hold)
                    || answer.json["quantity"].as_u64() != Some(u64::from(h.quantity))
                {
                    return self.violate(format!("confirm {hold}: {}", answer.body));
                }
                match h.state {
                    HoldKnown::Confirmed => {
                        if let Some(first) = &h.sale_body
                            && (*first != answer.body || !answer.replayed)
                        {
                            self.violate(format!(
                                "confirm {hold}: first {first}, now {} (replayed {})",
                                answer.body, answer.replayed
                            ));
                        }
                        self.holds.get_mut(&hold).unwrap().sale_body = Some(answer.body.clone());
                        return;
                    }
                    HoldKnown::Released | HoldKnown::Expired => {
                        return self.violate(format!("confirm {hold}: a {:?} hold sold", h.state));
                    }
                    HoldKnown::Live => {}
                }
                if !h.confirm_pending && answer.sent_ms > h.expires_ms + CLOCK_MARGIN_MS {
                    return self.violate(format!("confirm {hold}: sold after its expiry"));
                }
                if answer.replayed && !h.confirm_pending {
                    self.violate(format!("confirm {hold}: replayed a sale never made"));
                }
                let held = self.holds.get_mut(&hold).unwrap();
                held.state = HoldKnown::Confirmed;
                held.confirm_pending = false;
                held.release_pending = false;
                held.sale_body = Some(answer.body.clone());
                let key = format!("hold {hold}");
                self.new_sale(hold, h.event, key, h.quantity, h.buyer, true);
                self.check_buyer(h.event, h.buyer, answer.received_ms);
            }
            Some(410) if answer.code() == "HOLD_EXPIRED" => {
                let released = answer.json["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("released"));
                let lawful = match h.state {
                    HoldKnown::Confirmed => false,
                    HoldKnown::Released => released,
                    HoldKnown::Expired => true,
                    HoldKnown::Live if released => h.release_pending,
                    HoldKnown::Live => answer.received_ms + CLOCK_MARGIN_MS >= h.expires_ms,
                };
                if !lawful {
                    return self.violate(format!(
                        "confirm {hold} ({:?}, release pending {}, expires {}): {} at {}",
                        h.state, h.release_pending, h.expires_ms, answer.body, answer.sent_ms
                    ));
                }
                let held = self.holds.get_mut(&hold).unwrap();
                held.state = if released {
                    HoldKnown::Released
                } else {
                    HoldKnown::Expired
                };
                held.confirm_pending = false;
                held.release_pending = false;
            }
            Some(404) if answer.code() == "HOLD_NOT_FOUND" => {
                self.hold_not_found(hold, "confirm", answer);
            }
            _ => self.violate(format!(
                "confirm {hold} ({:?}): {:?} {}",
                h.state, answer.status, answer.body
            )),
        }
    }

    /// A release's answer.
    pub fn release_answered(&mut self, hold: Uuid, answer: &Answer) {
        let h = self.holds[&hold].clone();
        let first = &mut self.holds.get_mut(&hold).unwrap().first_release_ms;
        first.get_or_insert(answer.sent_ms);
        if answer.indefinite() {
            self.holds.get_mut(&hold).unwrap().release_pending = true;
            return;
        }
        match answer.status {
            Some(204) => {
                if h.state == HoldKnown::Confirmed {
                    return self.violate(format!("release {hold}: a confirmed hold released"));
                }
                let held = self.holds.get_mut(&hold).unwrap();
                if held.state == HoldKnown::Live {
                    held.state = if answer.sent_ms < h.expires_ms - CLOCK_MARGIN_MS {
                        HoldKnown::Released
                    } else {
                        // Released or expired, whichever came first: either way ended.
                        HoldKnown::Expired
                    };
                }
                held.release_pending = false;
                held.confirm_pending = false;
            }
            Some(409) if answer.code() == "HOLD_CONFIRMED" => match h.state {
                HoldKnown::Confirmed => {}
                HoldKnown::Live if h.confirm_pending => {
                    let held = self.holds.get_mut(&hold).unwrap();
                    held.state = HoldKnown::Confirmed;
                    held.confirm_pending = false;
                    let key = format!("hold {hold}");
                    self.new_sale(hold, h.event, key, h.quantity, h.buyer, true);
                }
                _ => self.violate(format!("release {hold} ({:?}): HOLD_CONFIRMED", h.state)),
            },
            Some(404) if answer.code() == "HOLD_NOT_FOUND" => {
                self.hold_not_found(hold, "release", answer);
            }
            _ => self.violate(format!(
                "release {hold} ({:?}): {:?} {}",
                h.state, answer.status, answer.body
            )),
        }
    }

    /// A cancellation's answer.
    pub fn cancel_answered(&mut self, sale: Uuid, answer: &Answer) {
        let s = self.sales[&sale].clone();
        if answer.indefinite() {
            self.sales.get_mut(&sale).unwrap().cancel_pending = true;
            return;
        }
        let at = answer.json["cancelledAt"].as_str().map(str::to_owned);
        match (answer.status, at) {
            (Some(200), Some(at)) => match &s.cancelled {
                Some((first, first_at)) if *first != answer.body || *first_at != at => {
                    self.violate(format!("cancel {sale}: first {first}, now {}", answer.body));
                }
                Some(_) => {}
                None => {
                    let sold = self.sales.get_mut(&sale).unwrap();
                    sold.cancelled = Some((answer.body.clone(), at));
                    sold.cancel_pending = false;
                }
            },
            _ => self.violate(format!(
                "cancel {sale}: {:?} {}",
                answer.status, answer.body
            )),
        }
    }

    /// Joining or polling the waiting room (`joined_ms`: when this buyer first
    /// joined, for a new ticket).
    pub fn queue_answered(&mut self, event: usize, buyer: usize, answer: &Answer, joining: bool) {
        if answer.indefinite() {
            return;
        }
        let known = self.tickets.get(&(event, buyer)).cloned();
        let expected = if joining { 202 } else { 200 };
        if answer.status == Some(404) && answer.code() == "TICKET_NOT_FOUND" && !joining {
            match known {
                Some(t) if t.epoch == self.epoch => self.violate(format!(
                    "ticket {} of buyer {buyer} lost without a fault",
                    t.ticket
                )),
                _ => {
                    self.tickets.remove(&(event, buyer));
                }
            }
            return;
        }
        if answer.status != Some(expected) {
            return self.violate(format!("queue: {:?} {}", answer.status, answer.body));
        }
        let Some(ticket) = answer.json["ticket"].as_str().map(str::to_owned) else {
            return self.violate(format!("queue: {}", answer.body));
        };
        let mut model = match known {
            Some(t) if t.ticket == ticket && t.epoch == self.epoch => t,
            // The same name in a room rebuilt since: another ticket.
            Some(t) if t.ticket == ticket => TicketModel {
                epoch: self.epoch,
                admission: None,
                spent: false,
                ..t
            },
            // A spent admission: joining again is joining at the back.
            Some(t)
                if t.epoch == self.epoch
                    && !(joining
                        && (t.spent
                            || t.admission
                                .as_ref()
                                .is_some_and(|(_, exp)| *exp <= answer.sent_ms))) =>
            {
                return self.violate(format!(
                    "buyer {buyer}: ticket {} became {ticket} without a fault",
                    t.ticket
                ));
            }
            _ if joining => TicketModel {
                ticket: ticket.clone(),
                epoch: self.epoch,
                joined_ms: *self
                    .joined
                    .entry((event, buyer, ticket.clone()))
                    .or_insert(answer.sent_ms),
                admission: None,
                spent: false,
            },
            _ => return self.violate(format!("poll of an unknown ticket: {}", answer.body)),
        };
        if answer.json["admissionExpired"] == true {
            model.spent = true;
            let spent = model
                .admission
                .as_ref()
                .is_some_and(|(_, exp)| *exp <= answer.received_ms + CLOCK_MARGIN_MS);
            if !spent && model.epoch == self.epoch && model.admission.is_some() {
                self.violate(format!(
                    "{ticket}: its admission expired early: {}",
                    answer.body
                ));
            }
        }
        if answer.json["admitted"] == true {
            let (Some(token), Some(expires_ms), Some(admitted_ms)) = (
                answer.json["admissionToken"].as_str(),
                answer.time_ms("expiresAt"),
                answer.time_ms("admittedAt"),
            ) else {
                return self.violate(format!("admission: {}", answer.body));
            };
            if expires_ms + 1_000 <= answer.received_ms {
                self.violate(format!(
                    "{ticket}: an admission already expired: {}",
                    answer.body
                ));
            }
            if ticket.starts_with('o') && admitted_ms + CLOCK_MARGIN_MS < model.joined_ms {
                self.violate(format!(
                    "{ticket}: admitted before it joined: {}",
                    answer.body
                ));
            }
            if let Some((_, first_expiry)) = &model.admission
                && *first_expiry != expires_ms
            {
                self.violate(format!(
                    "{ticket}: its admission's expiry moved: {}",
                    answer.body
                ));
            }
            model.admission = Some((token.to_owned(), expires_ms));
            self.admissions
                .entry((event, model.epoch))
                .or_default()
                .insert(ticket.clone(), admitted_ms);
        }
        self.tickets.insert((event, buyer), model);
    }

    pub fn admission_token(&self, event: usize, buyer: usize) -> Option<(String, i64)> {
        self.tickets.get(&(event, buyer))?.admission.clone()
    }

    /// An event's seats as `GET` answered them, against what is known.
    pub fn event_answered(&mut self, event: usize, answer: &Answer) {
        if answer.indefinite() {
            return;
        }
        if answer.status != Some(200) {
            return self.violate(format!(
                "event {event}: {:?} {}",
                answer.status, answer.body
            ));
        }
        let n = |field: &str| answer.json[field].as_i64().unwrap_or(i64::MIN);
        let (total, sold, held, left) = (
            n("totalSeats"),
            n("seatsSold"),
            n("seatsHeld"),
            n("seatsRemaining"),
        );
        let (low, high) = self.sold_bounds(event);
        let model_total = self.events[event].total;
        if total != model_total
            || sold + held + left != total
            || sold < 0
            || held < 0
            || left < 0
            || sold < low
            || sold > high
        {
            self.violate(format!(
                "event {event}: sold {sold} (known {low}..={high}), held {held}, left {left}, \
                 total {total} of {model_total}"
            ));
        }
    }

    /// Seats sold for certain, and at most (pending requests may have sold or
    /// cancelled).
    pub fn sold_bounds(&self, event: usize) -> (i64, i64) {
        let mut low = 0;
        let mut high = 0;
        for sale in self.sales.values().filter(|s| s.event == event) {
            let q = i64::from(sale.quantity);
            if sale.cancelled.is_none() {
                high += q;
                if !sale.cancel_pending {
                    low += q;
                }
            }
        }
        for key in self.keys.values().filter(|k| k.event == event && !k.hold) {
            let decided_sale = key.decided.as_ref().is_some_and(|(s, ..)| *s == 200);
            if key.pending && !decided_sale {
                high += i64::from(key.quantity);
            }
        }
        for hold in self.holds.values().filter(|h| h.event == event) {
            if hold.confirm_pending && hold.state == HoldKnown::Live {
                high += i64::from(hold.quantity);
            }
        }
        (low, high)
    }

    /// Whether anything is still undecided.
    pub fn pending(&self) -> bool {
        self.keys.values().any(|k| k.pending)
            || self
                .holds
                .values()
                .any(|h| h.state == HoldKnown::Live && (h.confirm_pending || h.release_pending))
            || self
                .sales
                .values()
                .any(|s| s.cancel_pending && s.cancelled.is_none())
    }

    /// The waiting room admits no faster than its rate within an epoch.
    pub fn check_admission_rate(&mut self) {
        let mut found = None;
        for ((event, epoch), moments) in &self.admissions {
            let Some(rate) = self.events[*event].rate else {
                continue;
            };
            let mut at: Vec<i64> = moments.values().copied().collect();
            at.sort_unstable();
            let spacing = 1000 / i64::from(rate);
            for pair in at.windows(2) {
                if pair[1] - pair[0] < spacing - 1 {
                    found = Some(format!(
                        "event {event}, epoch {epoch}: admissions {} ms apart at {rate}/s: {at:?}",
                        pair[1] - pair[0]
                    ));
                }
            }
        }
        if let Some(v) = found {
            self.violate(v);
        }
    }

    /// Rows of `purchases` against the sales: the books at the end of a run, when
    /// nothing is pending and the streams are drained.
    pub fn check_rows(&mut self, rows: &[Row], event_ids: &HashMap<Uuid, usize>) {
        let mut by_id: HashMap<Uuid, &Row> = HashMap::new();
        for row in rows {
            if by_id.insert(row.id, row).is_some() {
                return self.violate(format!("two rows with id {}", row.id));
            }
        }
        let mut violations = Vec::new();
        for (id, sale) in &self.sales {
            let Some(row) = by_id.get(id) else {
                violations.push(format!("sale {id} ({}) has no row", sale.key));
                continue;
            };
            if event_ids.get(&row.event) != Some(&sale.event)
                || row.quantity != i16::from(sale.quantity)
                || row.via_hold != sale.via_hold
                || (!sale.via_hold && row.key != sale.key)
            {
                violations.push(format!("sale {id} {sale:?} has row {row:?}"));
            }
            let cancelled_at = sale.cancelled.as_ref().and_then(|(_, at)| {
                chrono::DateTime::parse_from_rfc3339(at)
                    .ok()
                    .map(|t| t.with_timezone(&chrono::Utc))
            });
            if cancelled_at != row.cancelled_at {
                violations.push(format!(
                    "sale {id}: cancelled at {cancelled_at:?}, row says {:?}",
                    row.cancelled_at
                ));
            }
        }
        for row in rows {
            if !self.sales.contains_key(&row.id) {
                violations.push(format!("row {row:?} is no sale anyone was told of"));
            }
        }
        let mut per_key: HashMap<(Uuid, &str), usize> = HashMap::new();
        for row in rows.iter().filter(|r| !r.via_hold) {
            *per_key.entry((row.event, row.key.as_str())).or_default() += 1;
        }
        if let Some(((_, key), n)) = per_key.iter().find(|(_, n)| **n > 1) {
            violations.push(format!("key {key} sold {n} times"));
        }
        for (i, event) in self.events.iter().enumerate() {
            let seats: i64 = rows
                .iter()
                .filter(|r| r.event == event.id && r.cancelled_at.is_none())
                .map(|r| i64::from(r.quantity))
                .sum();
            if seats > event.total {
                violations.push(format!(
                    "event {i}: {seats} seats in rows of {}",
                    event.total
                ));
            }
            if let Some(limit) = event.limit {
                let mut per_buyer: HashMap<&str, i64> = HashMap::new();
                for row in rows
                    .iter()
                    .filter(|r| r.event == event.id && r.cancelled_at.is_none())
                {
                    if let Some(buyer) = &row.buyer {
                        *per_buyer.entry(buyer).or_default() += i64::from(row.quantity);
                    }
                }
                if let Some((buyer, n)) = per_buyer.iter().find(|(_, n)| **n > limit) {
                    violations.push(format!("event {i}: buyer {buyer} has {n} > {limit} seats"));
                }
            }
        }
        if let Some(v) = violations.into_iter().next() {
            self.violate(v);
        }
    }
}

/// A row of `purchases`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: Uuid,
    #[sqlx(rename = "event_id")]
    pub event: Uuid,
    #[sqlx(rename = "idempotency_key")]
    pub key: String,
    pub quantity: i16,
    pub buyer: Option<String>,
    pub via_hold: bool,
    pub cancelled_at: Option<chrono::DateTime<chrono::Utc>>,
}

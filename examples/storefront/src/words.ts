// What the API's error codes mean to a buyer. The API's own `message` is written for
// developers; a buyer gets these words.

import type { ErrorBody, Event } from "./client";

export function buyerWords(error: ErrorBody, event?: Event): string {
  switch (error.error) {
    case "SOLD_OUT":
      return event && event.seatsRemaining > 0
        ? `Not enough seats left: only ${event.seatsRemaining} remain. Choose fewer tickets.`
        : "Sold out. There are no seats left for this event.";
    case "BUYER_LIMIT":
      return event?.maxPerBuyer
        ? `You already have as many tickets as one buyer may have for this event (${event.maxPerBuyer}).`
        : "You already have as many tickets as one buyer may have for this event.";
    case "BUYER_TOKEN_REQUIRED":
      return "Please sign in to buy tickets for this event.";
    case "BUYER_TOKEN_INVALID":
      return "Your sign-in has expired. Please sign in again.";
    case "ADMISSION_REQUIRED":
      return "This sale has a waiting room, and it is not your turn yet (or your turn has ended). Join the queue to buy.";
    case "HOLD_EXPIRED":
      return "Your hold expired, and the seats went back on sale.";
    case "HOLD_CONFIRMED":
      return "These tickets are already bought.";
    case "HOLD_NOT_FOUND":
      return "This hold no longer exists. It may have expired.";
    case "EVENT_NOT_FOUND":
      return "This event does not exist, or is no longer on sale.";
    case "INVALID_QUANTITY":
      return "Choose between 1 and 10 tickets.";
    case "IDEMPOTENCY_KEY_REUSED":
      return "This order was already placed with other details. Please start again.";
    case "SERVICE_UNAVAILABLE":
    case "INTERNAL_ERROR":
    case "REQUEST_TIMEOUT":
      return stillTrying;
    default:
      return `Something went wrong (${error.error}). Please try again.`;
  }
}

export const stillTrying =
  "The box office did not answer. Your order is kept: try again, and it will go through at most once.";

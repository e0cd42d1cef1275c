-- The seat lifecycle: holds (their time per event), limits per buyer, cancellations.
-- Holds live in Redis only; a sale made by confirming one is a purchase like any other.

ALTER TABLE events
    ADD COLUMN hold_seconds  integer NOT NULL DEFAULT 600 CHECK (hold_seconds > 0),
    -- Seats one buyer may have (sold + held); NULL: no limit, no buyer token needed.
    ADD COLUMN max_per_buyer integer CHECK (max_per_buyer > 0);

ALTER TABLE purchases
    -- The verified `sub` of the buyer's token, when the request carried one.
    ADD COLUMN buyer        text,
    -- Made by confirming a hold: the row's id is the hold's, and its idempotency key
    -- was the hold request's (so it is not restored as a purchase's record).
    ADD COLUMN via_hold     boolean NOT NULL DEFAULT false,
    -- When an admin cancelled the sale (its seats went back on sale).
    ADD COLUMN cancelled_at timestamptz;

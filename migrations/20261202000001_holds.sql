-- Holds, as the gate made them, so that a loss of Redis data neither loses a live
-- hold nor brings back one that ended (src/recovery). A hold is confirmed when
-- `purchases` has a row with its id, released when `released_at` is set, and expired
-- when neither happened by `expires_at`. Rows are kept while the hold's idempotency
-- record could still be asked for (`BOXOFFICE_IDEMPOTENCY_TTL` past its expiry),
-- then pruned by the stream consumer.

CREATE TABLE holds (
    id              uuid        PRIMARY KEY,
    event_id        uuid        NOT NULL REFERENCES events (id),
    idempotency_key text        NOT NULL,
    quantity        smallint    NOT NULL CHECK (quantity BETWEEN 1 AND 10),
    buyer           text,
    -- Seats left right after the hold, as its 201 said.
    seats_remaining integer     NOT NULL,
    held_at         timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    released_at     timestamptz
);

CREATE INDEX holds_event_expiry_idx ON holds (event_id, expires_at);
-- Pruning finds expired holds of every event.
CREATE INDEX holds_expiry_idx ON holds (expires_at);

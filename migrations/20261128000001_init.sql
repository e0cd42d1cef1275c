-- Events and the purchases sold for them. Seat counters live in Redis (the gate);
-- these tables are the durable record the stream consumer writes.

CREATE TABLE events (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    total_seats integer     NOT NULL CHECK (total_seats > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE purchases (
    -- UUID v7 chosen by the purchase script: a redelivered stream entry is the same row.
    id              uuid        PRIMARY KEY,
    event_id        uuid        NOT NULL REFERENCES events (id),
    idempotency_key text        NOT NULL,
    quantity        smallint    NOT NULL CHECK (quantity BETWEEN 1 AND 10),
    -- When Redis made the sale, not when the row arrived.
    sold_at         timestamptz NOT NULL,
    persisted_at    timestamptz NOT NULL DEFAULT now()
);

-- Not unique: after its TTL a client may reuse a key for a new sale.
CREATE INDEX purchases_event_key_idx ON purchases (event_id, idempotency_key);

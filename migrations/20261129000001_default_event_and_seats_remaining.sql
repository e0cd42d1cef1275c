-- The default event is a stored fact, not "the oldest event" worked out by each
-- replica at startup: replicas that disagreed on it would keep an Idempotency-Key
-- under two events, and a retry could buy twice.
CREATE TABLE default_event (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    event_id  uuid    NOT NULL REFERENCES events (id)
);

-- What replicas chose until now.
INSERT INTO default_event (event_id)
SELECT id FROM events ORDER BY created_at, id LIMIT 1;

-- Seats left right after the sale, as its 200 said, so that an idempotency record
-- restored from PostgreSQL replays the first answer exactly. NULL for rows written
-- before this column existed (recomputed from the order of sales instead).
ALTER TABLE purchases ADD COLUMN seats_remaining integer;

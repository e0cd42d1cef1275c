-- Queued events: buyers join a waiting room and are admitted at a fixed rate from
-- `queue_opens_at`, those who joined before it in a random order (`queue_seed` keys
-- the permutation), later ones first come, first served. All four or none.

ALTER TABLE events
    ADD COLUMN queue_opens_at          timestamptz,
    ADD COLUMN queue_admit_per_second  integer CHECK (queue_admit_per_second > 0),
    ADD COLUMN queue_admission_seconds integer CHECK (queue_admission_seconds > 0),
    ADD COLUMN queue_seed              bigint,
    ADD CONSTRAINT events_queue_all_or_none CHECK (
        (queue_opens_at IS NULL) = (queue_admit_per_second IS NULL)
        AND (queue_opens_at IS NULL) = (queue_admission_seconds IS NULL)
        AND (queue_opens_at IS NULL) = (queue_seed IS NULL));

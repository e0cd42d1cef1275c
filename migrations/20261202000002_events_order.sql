-- Pages of GET /api/v1/events walk events in creation order.
CREATE INDEX events_created_idx ON events (created_at, id);

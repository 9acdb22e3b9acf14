-- The delivery ledger ("a phone rings once"): which tokens a push service accepted for a ring,
-- written before the ring's ack and read when a ring may have been seen before (redelivered,
-- back from a retry tier, handed back), by any worker.
--
-- One row per settled push of a ring that reached at least one phone: the ring (the gateway
-- of its routing key and its event id) and the accepted tokens as 8-byte hashes (the first
-- 8 bytes of SHA-256 of the token), concatenated. Rows are only ever inserted and deleted.
-- A row is useless once the ring's TTL has passed (a ring that old is never pushed again), so
-- workers sweep rows older than the TTL plus a margin by `recorded_at`, through the BRIN
-- index (rows arrive in time order): no full-table scan.
CREATE TABLE ring_ledger (
    gateway_id  text NOT NULL,
    event_id    text NOT NULL,
    accepted    bytea NOT NULL CHECK (length(accepted) > 0 AND length(accepted) % 8 = 0),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ring_ledger_ring ON ring_ledger (gateway_id, event_id);
CREATE INDEX ring_ledger_recorded_at ON ring_ledger USING brin (recorded_at);

-- Ring claims ("a phone rings once", also for a gateway's re-publish): a gateway whose
-- publisher confirm was lost publishes the same ring again, and both copies are first
-- deliveries. A ring is its gateway (of the routing key) and its `event_id`; before a batch is
-- pushed, a worker claims its rings here in one statement (on the primary) and reads, for a
-- ring claimed before, the delivery ledger in the same statement. A copy whose ring another
-- worker holds (a live lease) waits until that worker's ledger entry is written and its claim
-- released; a claim whose lease lapsed (its worker died) is taken over.
--
-- UNLOGGED: a claim is coordination that lives seconds, not a record — no WAL, so claiming
-- costs no WAL flush before the push, and a standby does not replay it. After a crash or a
-- failover the table comes back empty: a re-publish whose copies straddle that moment may ring
-- twice (the ledger, which is logged, still covers every settled ring). fillfactor 50 leaves
-- room on each page for the release and renewals (updates of a non-indexed column) to stay
-- heap-only.
--
-- One row per ring, keyed by `ring`: the first 8 bytes of SHA-256 of the gateway id, a NUL and
-- the event id (a fixed-size key keeps the one index small and cheap; two rings whose keys
-- collide only wait for each other). With it: the ring's ids, who holds it (a random id per worker process), until when (`lease_until`,
-- renewed while the ring is in hand), how often it was claimed (`claims`, so a release or
-- renewal touches only the claim it belongs to), when it was first claimed and when the
-- current claim was taken (`taken_at`). A claim ends when its holder's ledger entry is
-- written (a `ring_ledger` row of the ring recorded since `taken_at`: the usual case costs no
-- write here) or, for a ring settled without an entry, when its lease is set to now(). Rows
-- useless once the ring's TTL has passed are swept by `claimed_at` through the BRIN index, like
-- the ledger's.
CREATE UNLOGGED TABLE ring_claims (
    ring        bigint PRIMARY KEY,
    gateway_id  text NOT NULL,
    event_id    text NOT NULL,
    holder      text NOT NULL,
    lease_until timestamptz NOT NULL,
    claims      integer NOT NULL DEFAULT 1,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    taken_at    timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);
CREATE INDEX ring_claims_claimed_at ON ring_claims USING brin (claimed_at);

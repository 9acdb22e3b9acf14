-- Schema v3 (contract v3): a ring's life. A doorbell ring is a call: it starts (a press) and
-- ends — answered, declined, the door opened, cancelled (by the gateway), or missed (nobody
-- answered within RINGPUSH_RING_TIMEOUT). Every existing row and statement keeps working.

-- What "Answered by …" says; no name: "Answered".
ALTER TABLE users ADD COLUMN name text;

-- One row per ring a worker saw (or whose end it saw first), kept RINGPUSH_RING_HISTORY:
-- - a ring: `pressed_at` and `deadline` (pressed_at + the ring timeout) set, `state` 'ringing'
--   until its first end; `phones` counts the phones that took it (added when the delivery
--   ledger is written);
-- - a press folded into a ring still ringing (debounce): `folded_into` names that ring; an
--   end naming the press ends that ring, and the history counts the press there;
-- - an end whose ring is not known yet: `pressed_at` NULL, the end's state; the ring, when it
--   comes, is not pushed. Such a row is swept once the ring TTL has passed.
-- `end_event_id` is the event id of the end that won (the first); for `missed`, the ring's own.
CREATE TABLE rings (
    gateway_id   text NOT NULL,
    event_id     text NOT NULL,
    switch_id    text,
    pressed_at   timestamptz,
    deadline     timestamptz,
    state        text NOT NULL DEFAULT 'ringing'
        CHECK (state IN ('ringing', 'answered', 'declined', 'door_opened', 'cancelled', 'missed')),
    ended_at     timestamptz,
    reason       text,
    by_user      bigint,
    end_event_id text,
    folded_into  text,
    phones       integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, event_id)
);
-- The rings still ringing, by deadline: what the missed sweep reads (small: the last
-- RINGPUSH_RING_TIMEOUT's rings).
CREATE INDEX rings_due ON rings (deadline)
    WHERE state = 'ringing' AND folded_into IS NULL AND deadline IS NOT NULL;
-- The rings still ringing, by gateway: what debounce reads.
CREATE INDEX rings_ringing ON rings (gateway_id)
    WHERE state = 'ringing' AND folded_into IS NULL;
-- The presses folded into a ring (the history counts them).
CREATE INDEX rings_folded ON rings (gateway_id, folded_into) WHERE folded_into IS NOT NULL;
-- Retention: swept by age through the BRIN index (rows arrive in time order).
CREATE INDEX rings_created_at ON rings USING brin (created_at);

-- The history the app's backend reads (read-only): one row per ring, its presses counted.
CREATE VIEW ring_history AS
SELECT r.gateway_id,
       r.event_id,
       r.switch_id,
       r.pressed_at,
       r.state,
       r.ended_at,
       r.reason,
       r.by_user,
       r.phones,
       1 + (SELECT count(*) FROM rings f
            WHERE f.gateway_id = r.gateway_id AND f.folded_into = r.event_id)::integer AS presses
FROM rings r
WHERE r.pressed_at IS NOT NULL AND r.folded_into IS NULL;

-- Ends a ring: the first end wins. `p_ring` may name a press folded into another ring (that
-- ring is ended). A ring not known yet gets a row holding its end (its ring, when it comes,
-- is not pushed). Returns whether this end (`p_end`, its own event id) is the one that ended
-- the ring — also when it is asked again (a redelivered or retried end) — and the ring as it
-- stands. One statement's worth of work, in one round trip.
CREATE FUNCTION ringpush_end_ring(p_gateway text, p_ring text, p_end text, p_state text,
                                  p_by bigint, p_at timestamptz)
RETURNS TABLE (won boolean, target text, state text, pressed_at timestamptz,
               ended_at timestamptz, by_name text)
LANGUAGE plpgsql AS $$
DECLARE
    v_target text;
    v_row rings%ROWTYPE;
BEGIN
    FOR attempt IN 1..3 LOOP
        SELECT coalesce(r.folded_into, r.event_id) INTO v_target
        FROM rings r WHERE r.gateway_id = p_gateway AND r.event_id = p_ring;
        v_target := coalesce(v_target, p_ring);
        UPDATE rings r
        SET state = p_state, ended_at = coalesce(p_at, now()), reason = p_state,
            by_user = p_by, end_event_id = p_end
        WHERE r.gateway_id = p_gateway AND r.event_id = v_target AND r.state = 'ringing'
        RETURNING * INTO v_row;
        IF NOT FOUND THEN
            INSERT INTO rings AS r (gateway_id, event_id, state, ended_at, reason, by_user,
                                    end_event_id)
            VALUES (p_gateway, v_target, p_state, coalesce(p_at, now()), p_state, p_by, p_end)
            ON CONFLICT (gateway_id, event_id) DO NOTHING
            RETURNING * INTO v_row;
        END IF;
        IF NOT FOUND THEN
            SELECT * INTO v_row FROM rings r
            WHERE r.gateway_id = p_gateway AND r.event_id = v_target;
            -- Ringing after all (the ring arrived between the two statements): again.
            CONTINUE WHEN v_row.state = 'ringing';
        END IF;
        RETURN QUERY SELECT v_row.end_event_id IS NOT DISTINCT FROM p_end, v_target,
            v_row.state, v_row.pressed_at, v_row.ended_at,
            (SELECT u.name FROM users u WHERE u.id = v_row.by_user);
        RETURN;
    END LOOP;
    RAISE EXCEPTION 'ring % of gateway % kept changing while it was ended', p_ring, p_gateway;
END
$$;

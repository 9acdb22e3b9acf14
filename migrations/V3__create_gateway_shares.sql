CREATE TABLE gateway_shares (
    gateway_id text NOT NULL REFERENCES gateways (id) ON DELETE CASCADE,
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, user_id)
);
CREATE INDEX gateway_shares_user_id ON gateway_shares (user_id);

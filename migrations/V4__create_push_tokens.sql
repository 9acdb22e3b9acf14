-- One row per app install: the token is lower-case hex of any even length (APNs says not to
-- assume a size); updated_at is the last time the phone registered it.
CREATE TABLE push_tokens (
    token       text PRIMARY KEY CHECK (token ~ '^([0-9a-f]{2})+$' AND length(token) <= 200),
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    environment text NOT NULL DEFAULT 'production' CHECK (environment IN ('production', 'sandbox')),
    topic       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX push_tokens_user_id ON push_tokens (user_id);

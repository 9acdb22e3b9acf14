-- Schema v2: where a token lives (platform: APNs or FCM) and how the phone wants a ring (kind:
-- an alert banner, or a call-style full-screen ring). The defaults make every v1 row an APNs
-- alert token, and a v1 registration statement (no platform, no kind) keeps working; adding
-- a column with a constant default rewrites no row.
ALTER TABLE push_tokens
    ADD COLUMN platform text NOT NULL DEFAULT 'apns' CHECK (platform IN ('apns', 'fcm')),
    ADD COLUMN kind     text NOT NULL DEFAULT 'alert' CHECK (kind IN ('alert', 'call'));

-- The token's shape now depends on its platform: APNs's lower-case hex of any even length up
-- to 100 bytes (as in v1), or an FCM registration token of 1 to 512 characters of
-- A-Z a-z 0-9 _ - : . (the length bounded with length(): a regex repeat count stops at 255).
ALTER TABLE push_tokens DROP CONSTRAINT push_tokens_token_check;
ALTER TABLE push_tokens ADD CONSTRAINT push_tokens_token_check CHECK (
    (platform = 'apns' AND token ~ '^([0-9a-f]{2})+$' AND length(token) <= 200)
    OR (platform = 'fcm' AND token ~ '^[A-Za-z0-9_:.-]+$' AND length(token) BETWEEN 1 AND 512)
);

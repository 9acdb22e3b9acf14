-- Schema v2.1: a token's platform may be any provider registered with the workers, not only
-- APNs and FCM (src/provider.rs: adding a provider is a folder and a registration, no
-- migration). A platform name is 1 to 32 of a-z 0-9 _, starting with a letter. APNs and FCM
-- tokens keep their shapes; another provider's token is 1 to 4096 printable ASCII
-- characters without spaces (the length bounded with length(): a regex repeat count stops
-- at 255). Every existing row and registration statement stays valid.
ALTER TABLE push_tokens DROP CONSTRAINT push_tokens_platform_check;
ALTER TABLE push_tokens ADD CONSTRAINT push_tokens_platform_check
    CHECK (platform ~ '^[a-z][a-z0-9_]*$' AND length(platform) <= 32);

ALTER TABLE push_tokens DROP CONSTRAINT push_tokens_token_check;
ALTER TABLE push_tokens ADD CONSTRAINT push_tokens_token_check CHECK (
    (platform = 'apns' AND token ~ '^([0-9a-f]{2})+$' AND length(token) <= 200)
    OR (platform = 'fcm' AND token ~ '^[A-Za-z0-9_:.-]+$' AND length(token) BETWEEN 1 AND 512)
    OR (platform NOT IN ('apns', 'fcm') AND token ~ '^[!-~]+$' AND length(token) BETWEEN 1 AND 4096)
);

-- Schema v3: which app a token belongs to (contract v3, "Many apps in one deployment"). One
-- deployment serves several apps — a brand's own, white-label brands, an installer's — each
-- with its own APNs topic and credentials and its own Firebase project; a token is pushed
-- with its app's. An app id is 1 to 64 of a-z 0-9 _ - (the name of its folder under
-- RINGPUSH_APPS_DIR). Every existing row and every v2 registration statement (no app) stays
-- valid: their tokens are the app `default`'s, configured by the single-app variables.
-- Adding a column with a constant default rewrites no rows (PostgreSQL 11 and later).
ALTER TABLE push_tokens
    ADD COLUMN app text NOT NULL DEFAULT 'default'
        CHECK (app ~ '^[a-z0-9_-]+$' AND length(app) <= 64);

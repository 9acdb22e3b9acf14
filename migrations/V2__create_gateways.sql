CREATE TABLE gateways (
    id         text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 128),
    owner_id   bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gateways_owner_id ON gateways (owner_id);

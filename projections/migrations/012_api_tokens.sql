-- Bearer tokens of the HTTP API (conclave tokens create|list|revoke). Not a read model:
-- no topic holds them, so a replay does not drop them (READ_MODEL_TABLES does not name
-- this table) and this migration runs again harmlessly after one.
-- Only a SHA-256 of each secret is kept; the secret itself is printed once, at creation.
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id    text PRIMARY KEY,
    name        text    NOT NULL,
    tenant      text    NOT NULL,
    admin       boolean NOT NULL DEFAULT false,  -- may halt and resume (every tenant's work)
    secret_hash bytea   NOT NULL,
    created_at  bigint  NOT NULL,                -- microseconds since the epoch
    revoked_at  bigint
);

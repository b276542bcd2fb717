-- Resource locks and versioned state (the coordination topic, streams/coordination.py).
-- locks: each lock's latest decision; lock_events: every grant, wait, denial, renewal,
-- release and expiry, in order (the audit trail); state_versions: every version of every
-- key (versions have no gaps: reading a past version is a lookup); state_checkpoints:
-- labelled versions; state_rejections: refused state requests with the current version.
CREATE TABLE IF NOT EXISTS locks (
    name text PRIMARY KEY,
    holder text,
    fencing_token bigint NOT NULL DEFAULT 0,
    expires_at bigint,
    state text NOT NULL,                         -- held, released, expired
    waiters text[] NOT NULL DEFAULT '{}',        -- holders in line, first first
    waiting_requests text[] NOT NULL DEFAULT '{}',
    updated_at bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS lock_events (
    event_id text PRIMARY KEY,
    name text NOT NULL,
    kind text NOT NULL,                          -- granted, waiting, denied, renewed, ...
    holder text NOT NULL,
    fencing_token bigint,
    expires_at bigint,
    reason text,
    request_id text,
    occurred_at bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS lock_events_by_name ON lock_events (name, occurred_at);
CREATE TABLE IF NOT EXISTS state_versions (
    key text NOT NULL,
    version bigint NOT NULL,
    value_json text NOT NULL,
    request_id text NOT NULL,
    restored_from bigint,                        -- a restore: the version whose value this is
    label text,                                  -- ... and its checkpoint's label
    updated_at bigint NOT NULL,
    PRIMARY KEY (key, version)
);
CREATE TABLE IF NOT EXISTS state_checkpoints (
    key text NOT NULL,
    label text NOT NULL,
    version bigint NOT NULL,
    checkpointed_at bigint NOT NULL,
    PRIMARY KEY (key, label)
);
CREATE TABLE IF NOT EXISTS state_rejections (
    event_id text PRIMARY KEY,
    key text NOT NULL,
    action text NOT NULL,
    expected_version bigint,
    current_version bigint NOT NULL,
    reason text NOT NULL,
    request_id text NOT NULL,
    rejected_at bigint NOT NULL
);

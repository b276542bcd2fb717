-- Runtime hosts' liveness (host.beat, host.lost), and agents the scheduler gives no work
-- to (a stalled attempt, a lost host) until it reinstates them.
CREATE TABLE IF NOT EXISTS hosts (
    host_id text PRIMARY KEY,
    pool text,
    agent_ids text[] NOT NULL DEFAULT '{}',
    last_beat_at bigint,
    lease_expires_at bigint,
    lost_lease bigint,
    lost_at bigint,
    lost_reason text
);
ALTER TABLE agents ADD COLUMN IF NOT EXISTS suspended_at bigint;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS suspended_reason text;

-- A task's retry policy, as submitted: `conclave dlq redrive` runs a dead letter again
-- with it (rows folded before this migration get the defaults).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS retry_backoff_ms bigint NOT NULL DEFAULT 1000;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS retry_multiplier double precision NOT NULL DEFAULT 2.0;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS retry_backoff_max_ms bigint NOT NULL DEFAULT 60000;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS retry_jitter double precision NOT NULL DEFAULT 0.2;

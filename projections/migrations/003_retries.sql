-- Retries with back-off: a task may wait ('retrying') until next_attempt_at; a failure
-- says whether the agent declared it permanent; stalled attempts are failures too; a
-- redriven dead letter names the task it runs again.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS next_attempt_at bigint;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS redrive_of text;
ALTER TABLE task_failures ADD COLUMN IF NOT EXISTS permanent boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS tasks_pool_status ON tasks (pool, status);
-- dlq redrive --all asks, for each dead letter, whether it was redriven already.
CREATE INDEX IF NOT EXISTS tasks_redrive_of ON tasks (redrive_of) WHERE redrive_of IS NOT NULL;

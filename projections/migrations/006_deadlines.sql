-- Deadlines: a task may expire ('expired') if it is not dispatched by start_by
-- (schedule-to-start) or not finished by finish_by (absolute), µs since the epoch.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS start_by bigint;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS finish_by bigint;

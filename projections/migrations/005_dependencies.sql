-- Dependencies and cancellation: a task may wait ('waiting') for the tasks it depends
-- on; it may end 'cancelled' or 'dependency_failed' (error says which dependency
-- failed and where the failure began).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS depends_on text[] NOT NULL DEFAULT '{}';

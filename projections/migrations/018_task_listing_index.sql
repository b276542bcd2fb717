-- A tenant's task listing (newest queued first, keyset pages on (queued_at, task_id)):
-- an index walk that stops after one page, not a sort of all the tenant's tasks.
CREATE INDEX IF NOT EXISTS tasks_by_tenant_queued ON tasks (tenant, queued_at DESC, task_id DESC);

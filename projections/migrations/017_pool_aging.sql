-- A pool's aging (pool.configured v2): null serves by strict priority; N lets a queued
-- task gain one priority level per N turns served in the pool.
ALTER TABLE pool_settings ADD COLUMN IF NOT EXISTS aging_turns integer;

-- One event may move an agent twice: a crash restart is `restarting`, then `idle`
-- (its host starts it afresh at once). `step` orders the changes of one event.
ALTER TABLE agent_events ADD COLUMN IF NOT EXISTS step smallint NOT NULL DEFAULT 0;
ALTER TABLE agent_events DROP CONSTRAINT IF EXISTS agent_events_pkey;
ALTER TABLE agent_events ADD PRIMARY KEY (event_id, agent_id, step);

-- Every change of an agent's state, with its reason (conclave/domain/lifecycle.py):
-- registered, busy, idle, unresponsive, circuit_open, probing, lost, retired. Read off
-- the events that caused it, one row per event and agent; `conclave agents show ID`.
CREATE TABLE IF NOT EXISTS agent_events (
    agent_id text NOT NULL,
    state text NOT NULL,
    reason text NOT NULL,
    task_id text,
    occurred_at bigint NOT NULL,
    event_id text NOT NULL,
    source_topic text NOT NULL,
    source_partition integer NOT NULL,
    source_offset bigint NOT NULL,
    PRIMARY KEY (event_id, agent_id)
);
CREATE INDEX IF NOT EXISTS agent_events_by_agent
    ON agent_events (agent_id, occurred_at, source_offset);

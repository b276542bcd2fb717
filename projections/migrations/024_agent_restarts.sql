-- Agents restarted after a crash (agent.restarted) and given up on past their restart
-- budget (agent.failed): `conclave agents` shows them `failed`, with the reason.
ALTER TABLE agents ADD COLUMN IF NOT EXISTS restarts integer;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS restarted_at bigint;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS failed_reason text;

-- Agents their host retired as the pool shrank (agent.retired, autoscaling): `conclave
-- agents` shows them `retired`, with the reason, until registered again.
ALTER TABLE agents ADD COLUMN IF NOT EXISTS retired_reason text;

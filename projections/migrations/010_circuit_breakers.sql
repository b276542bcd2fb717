-- Agents' circuit breakers (agent.circuit_opened / half_opened / closed).
ALTER TABLE agents ADD COLUMN IF NOT EXISTS circuit text;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS circuit_until bigint;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS circuit_reason text;

-- What an agent can do and which version it runs (agent.registered v2): found with
-- `conclave agents --capability C`.
ALTER TABLE agents ADD COLUMN IF NOT EXISTS capabilities text[];
ALTER TABLE agents ADD COLUMN IF NOT EXISTS version text;
CREATE INDEX IF NOT EXISTS agents_capabilities ON agents USING gin (capabilities);

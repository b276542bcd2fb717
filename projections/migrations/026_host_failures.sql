-- Hosts judged failed (host.failed: lost, then silent past the grace period): `conclave
-- hosts` and `conclave agents` show them and their agents `failed`, with the reason.
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS failed_lease bigint;
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS failed_reason text;

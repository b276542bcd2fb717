-- A runtime host that said it is stopping (host.leaving): its lease ends with its drain,
-- then its agents retire.
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS leaving_until bigint;

-- What a runtime host's newest beat measured (host.beat v2), and why it takes no new
-- work when it is over its memory or CPU limit.
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS rss_bytes bigint;
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS cpu_percent double precision;
ALTER TABLE hosts ADD COLUMN IF NOT EXISTS over_limit text;

-- Capacities operators set per pool at run time (pool.configured on the control topic,
-- witnessed): one row per decision, the newest per pool holds.
CREATE TABLE IF NOT EXISTS pool_settings (
    event_id      text PRIMARY KEY,
    pool          text    NOT NULL,
    capacity      integer NOT NULL,
    reason        text    NOT NULL,
    operator      text    NOT NULL,
    configured_at bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_settings_pool ON pool_settings (pool, configured_at);

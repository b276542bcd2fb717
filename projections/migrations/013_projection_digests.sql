-- Digests of the read models that replays committed to the witness log (projection.digest
-- on the control topic): what a later rebuild is proven equal to (docs/witness.md).
CREATE TABLE IF NOT EXISTS projection_digests (
    event_id    text PRIMARY KEY,
    schema_name text   NOT NULL,
    tables      text[] NOT NULL,  -- table:rows:sha256, sorted by table
    positions   text[] NOT NULL,  -- topic:partition:next_offset, sorted
    digest      text   NOT NULL,  -- SHA-256 over the table lines
    reason      text   NOT NULL,
    computed_at bigint NOT NULL   -- the event's time, microseconds since the epoch
);

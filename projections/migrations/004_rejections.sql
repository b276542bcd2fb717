-- Commands the scheduler refused (invalid field, priority not its topic's): the
-- submitter's answer to "what happened to my task?". One row per rejected command.
CREATE TABLE IF NOT EXISTS rejections (
    command_event_id text PRIMARY KEY,
    subject_id       text   NOT NULL,
    command_type     text   NOT NULL,
    reason           text   NOT NULL,
    tenant           text   NOT NULL,
    rejected_at      bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_subject ON rejections (subject_id);

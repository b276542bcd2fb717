-- Workflows (the workflows topic, streams/workflows.py): one row per workflow, one per
-- step (keyed by the step's task id, <workflow id>.<step>). A step's attempts are its
-- task's (tasks.attempt); its output is the accepted answer the workflow read.
CREATE TABLE IF NOT EXISTS workflows (
    workflow_id     text PRIMARY KEY,
    tenant          text NOT NULL,
    name            text NOT NULL,
    status          text NOT NULL,           -- running, completed, failed, cancelled, rejected
    input_json      text NOT NULL,
    definition_json text NOT NULL,
    steps           integer NOT NULL,
    failed_step     text,
    reason          text,
    started_at      bigint NOT NULL,
    ended_at        bigint
);
CREATE INDEX IF NOT EXISTS workflows_by_start ON workflows (started_at);
CREATE TABLE IF NOT EXISTS workflow_steps (
    task_id         text PRIMARY KEY,
    workflow_id     text NOT NULL,
    step            text NOT NULL,
    position        integer NOT NULL,        -- order in the definition
    pool            text NOT NULL,
    agent_id        text,
    priority        text NOT NULL,
    max_attempts    integer NOT NULL,
    depends_on      text[] NOT NULL,
    status          text NOT NULL,           -- pending, submitted, completed, failed, skipped, cancelled
    input           text,                    -- rendered, once submitted
    output          text,
    output_event_id text,
    submitted_at    bigint,
    ended_at        bigint
);
CREATE INDEX IF NOT EXISTS workflow_steps_by_workflow ON workflow_steps (workflow_id, position);

-- Read models: every table is a fold of the Kafka history topics.
-- No column defaults to now(): replaying the same events must give the same rows.

CREATE TABLE IF NOT EXISTS projection_offsets (
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE TABLE IF NOT EXISTS tasks (
    task_id          text PRIMARY KEY,
    tenant           text   NOT NULL,
    correlation_id   text   NOT NULL,
    pool             text   NOT NULL,
    priority         text   NOT NULL,
    status           text   NOT NULL,  -- queued | dispatched | completed | dead_lettered
    input            text   NOT NULL,
    agent_id         text,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    deliberation_id  text,
    output_event_id  text,
    witness_sequence bigint,
    error            text,
    queued_at        bigint NOT NULL,  -- microseconds since the epoch, from the events
    dispatched_at    bigint,
    finished_at      bigint
);
CREATE INDEX IF NOT EXISTS tasks_deliberation ON tasks (deliberation_id) WHERE deliberation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status);

CREATE TABLE IF NOT EXISTS outputs (
    event_id        text PRIMARY KEY,
    task_id         text    NOT NULL,
    agent_id        text    NOT NULL,
    attempt         integer NOT NULL,
    content         text    NOT NULL,
    latency_us      bigint  NOT NULL,
    deliberation_id text,
    produced_at     bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_task ON outputs (task_id);

CREATE TABLE IF NOT EXISTS task_failures (
    event_id      text PRIMARY KEY,
    task_id       text    NOT NULL,
    agent_id      text    NOT NULL,
    attempt       integer NOT NULL,
    error_type    text    NOT NULL,
    error_message text    NOT NULL,
    failed_at     bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS task_failures_task ON task_failures (task_id);

CREATE TABLE IF NOT EXISTS witness_entries (
    sequence         bigint PRIMARY KEY,
    previous_hash    bytea  NOT NULL,
    entry_hash       bytea  NOT NULL,
    subject_type     text   NOT NULL,
    subject_event_id text   NOT NULL UNIQUE,
    subject_digest   bytea  NOT NULL,
    recorded_at      bigint NOT NULL,
    task_id          text,
    agent_id         text,
    detail           text   NOT NULL,
    attempt          integer
);

-- Registrations and heartbeats come from different topics, so either may be folded
-- first: each fills in its own columns and the row is the same in any order.
CREATE TABLE IF NOT EXISTS agents (
    agent_id          text PRIMARY KEY,
    pool              text,
    host_id           text   NOT NULL,
    agent_ref         text,
    registered_at     bigint,
    last_heartbeat_at bigint,
    current_task_id   text,
    rss_bytes         bigint
);

CREATE TABLE IF NOT EXISTS system_events (
    event_id    text PRIMARY KEY,
    kind        text   NOT NULL,  -- system.halt | system.resume
    reason      text   NOT NULL,
    operator    text   NOT NULL,
    occurred_at bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS dead_letters (
    source_topic     text    NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint  NOT NULL,
    processor        text    NOT NULL,
    reason           text    NOT NULL,
    error_type       text    NOT NULL,
    original         bytea   NOT NULL,
    recorded_at      bigint  NOT NULL,
    PRIMARY KEY (source_topic, source_partition, source_offset, processor)
);

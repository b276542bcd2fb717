-- Agent-to-agent messages (the messages topic, conclave/messaging.py): one row per message
-- as sent, answers included (their correlation_id is the message they answer). Whether a
-- message expired before delivery is in dead_letters (reason 'expired').
CREATE TABLE IF NOT EXISTS messages (
    message_id text PRIMARY KEY,
    kind text NOT NULL,                          -- command, query, response, event, ...
    correlation_id text,
    sender text NOT NULL,
    recipient text NOT NULL,                     -- as addressed: agent, pool:P, broadcast:P
    agent_id text,                               -- resolved agent (null: broadcast, answer)
    host_id text,
    pool text,
    priority text NOT NULL,                      -- critical, high, normal, low
    expects_reply boolean NOT NULL,
    expires_at bigint,
    payload text NOT NULL,
    sent_at bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (sent_at);
CREATE INDEX IF NOT EXISTS messages_by_correlation ON messages (correlation_id);

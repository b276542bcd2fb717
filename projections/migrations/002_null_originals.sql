-- A dead letter of a null value (a Kafka tombstone) keeps NULL as its original,
-- so that it stays distinguishable from a record whose value was empty bytes.
ALTER TABLE dead_letters ALTER COLUMN original DROP NOT NULL;
